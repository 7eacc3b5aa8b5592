"""How the project's notebooks are executed: papermill, with each kernel on local IPC sockets.

jupyter_client's default is TCP on localhost, for which every kernel start prints "Kernel is running over
TCP without encryption" (ipykernel/kernelapp.py): a warning per run of a sweep. Our kernels are always
local, so they talk over Unix domain sockets instead: nothing listens on a port, and there is nothing to warn
about. Each kernel gets socket paths of its own (jupyter_client would number them from one shared name in the
working folder, so kernels started side by side, `sweep --jobs N`, took each other's sockets). Windows has no
such sockets; there the default (TCP) stays.
"""
import os
import tempfile
import uuid

from jupyter_client.manager import AsyncKernelManager
from traitlets import default


class IpcKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels listen on IPC sockets, not TCP ports."""

    @default("transport")
    def _default_transport(self):
        return "ipc"

    @default("ip")
    def _default_ip(self):  # the sockets are <ip>-<n>: short (a socket path has ~107 bytes) and unique
        return os.path.join(tempfile.gettempdir(), f"qlora-kernel-{uuid.uuid4().hex[:12]}")


def kernel_manager_class() -> type:
    """The kernel manager our notebooks run under: IPC sockets where the OS has them (nbclient's own is async)."""
    return AsyncKernelManager if os.name == "nt" else IpcKernelManager


def papermill_options() -> dict:
    """Keyword arguments for papermill.execute_notebook that pick our kernel manager."""
    return {"kernel_manager_class": kernel_manager_class()}
