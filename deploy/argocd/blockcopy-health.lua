-- Argo CD health check for BlockCopy (blockcopy.dev/v1alpha1).
-- Install: argocd-cm, key resource.customizations.health.blockcopy.dev_BlockCopy (README.md).
--
--   Healthy      Pivoted, Aborted (finished as asked), and Mirrored while neither spec.pivot nor
--                spec.abort is set: the copy is in sync and waits for the user.
--   Progressing  no status yet (no agent has claimed it), Pending, Queued, Preparing, Copying,
--                Mirrored with spec.pivot or spec.abort set (that is next, maybe after the rest
--                of its group), Pivoting, Aborting; also any live phase whose status does not
--                reflect the latest spec yet (observedGeneration).
--   Degraded     Failed.
-- status.message, when there is one, is part of every health message.
-- Only what Argo CD opens for a health script is used: the base, table and package libraries.
local hs = {}

local function with_message(text, status)
  if status ~= nil and status.message ~= nil and status.message ~= "" then
    return text .. ": " .. status.message
  end
  return text
end

local spec = obj.spec or {}
local status = obj.status
local phase = nil
if status ~= nil then
  phase = status.phase
end

if phase == nil or phase == "" then
  hs.status = "Progressing"
  hs.message = with_message("Waiting for the agent on the VM's node to claim the copy", status)
  return hs
end

if phase == "Pivoted" then
  hs.status = "Healthy"
  hs.message = with_message("Pivoted: the VM runs on the copy", status)
  return hs
end
if phase == "Aborted" then
  hs.status = "Healthy"
  hs.message = with_message("Aborted: the VM stays on its source", status)
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = with_message("Failed", status)
  return hs
end

-- A live phase: has the agent seen the latest spec (e.g. a commit that set pivot: true)?
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = with_message(phase .. ", spec change (generation " .. tostring(generation) ..
    ") not yet taken up by the agent", status)
  return hs
end

if phase == "Mirrored" then
  -- abort wins over pivot, as in the agent.
  if spec.abort == true then
    hs.status = "Progressing"
    hs.message = with_message("Mirrored, aborting next", status)
  elseif spec.pivot == true then
    hs.status = "Progressing"
    hs.message = with_message("Mirrored, pivoting next", status)
  else
    hs.status = "Healthy"
    hs.message = with_message("Mirrored and waiting for you: the copy is in sync; set spec.pivot: true to switch the VM to it (or spec.abort: true to keep a point-in-time copy)", status)
  end
  return hs
end

if phase == "Pending" or phase == "Queued" or phase == "Preparing" or phase == "Copying" or
    phase == "Pivoting" or
    phase == "Aborting" then
  hs.status = "Progressing"
  local text = phase
  if phase == "Copying" and status.progress ~= nil then
    text = "Copying (" .. status.progress .. ")"
  end
  hs.message = with_message(text, status)
  return hs
end

hs.status = "Unknown"
hs.message = with_message("Unknown phase " .. tostring(phase), status)
return hs
