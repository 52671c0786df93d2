"""The plugin's exit codes and the errors it shows the user as they are."""

from __future__ import annotations

# Exit codes (also in --help).
OK, NOT_REACHED, USAGE, NOT_FOUND, FAILURE = 0, 1, 2, 3, 4
EXIT_CODES = f"""exit codes:
  {OK}  done (wait: every object reached the phase)
  {NOT_REACHED}  wait: a copy Failed, ended in a phase from which the awaited one cannot be
     reached, or the timeout expired
  {USAGE}  usage error (bad or missing arguments)
  {NOT_FOUND}  a named BlockCopy, group or domain (or one of its disks) does not exist
  {FAILURE}  the API server or the kubeconfig refused or could not be reached
"""


class PluginError(Exception):
    """An error shown to the user as is, with the exit code it ends the plugin with."""

    def __init__(self, message: str, code: int = FAILURE, *, status: int | None = None):
        super().__init__(message)
        self.code, self.status = code, status  # status: the API server's HTTP status


class InventoryCannotTell(PluginError):
    """No node inventory in the API server describes the domain (no agent publishes one, the
    CRD is missing, the user may not read them, or the domain is not there)."""

    HINT = " (name the disks with --disk)"
