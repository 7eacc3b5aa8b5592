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

from jupyter_client.manager import KernelManager
from traitlets import default


class IpcKernelManager(KernelManager):
    """A kernel manager whose kernels listen on IPC sockets, not TCP ports."""

    @default("transport")
    def _default_transport(self):
        return "ipc"

    @default("ip")
    def _default_ip(self):  # the sockets are <ip>-<n>: short (a socket path has ~107 bytes) and unique
        return os.path.join(tempfile.gettempdir(), f"qlora-kernel-{uuid.uuid4().hex[:12]}")


def papermill_options() -> dict:
    """Keyword arguments for papermill.execute_notebook: the IPC kernel manager where the OS has IPC."""
    return {} if os.name == "nt" else {"kernel_manager_class": IpcKernelManager}
