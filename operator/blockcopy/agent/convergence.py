"""The convergence assist (``spec.convergence: auto``): the one action the agent takes on a
copy that does not converge, switching its running mirror to write-blocking where QEMU can.
``core.convergence`` decides when and says what it means; this collaborator asks the
hypervisor what it can do and acts."""

from __future__ import annotations

from blockcopy.core import convergence
from blockcopy.core.convergence import Assist
from blockcopy.model.ports import Hypervisor, HypervisorError, HypervisorUnavailable


class ConvergenceAssist:
    def __init__(self, hv: Hypervisor):
        self.hv = hv

    async def assist(self, domain: str, target: str) -> Assist:
        """Switch the copy of ``target`` to write-blocking, or say why not."""
        caps = await self.hv.capabilities()
        if not caps.block_job_change:
            return convergence.assist_unsupported(caps)
        try:
            await self.hv.set_copy_mode(domain, target, "write-blocking")
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            return convergence.assist_failed(str(exc))
        return convergence.assist_switched()
