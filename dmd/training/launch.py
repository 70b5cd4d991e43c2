"""`python -m dmd.training.launch N PARAMS [section.key=value ...]`: `python -m dmd.training.loop` on N processes of this machine,
every socket on loopback. N may be `auto`: one process per visible CUDA device (1 without CUDA), as
`train.num_processes: auto`.

The processes are started by torchrun (`torch.distributed.run`, what `accelerate launch` runs underneath); each
worker's Accelerator then picks NCCL on GPUs and gloo on CPU. torchrun serves its rendezvous store on all
interfaces, so the store is created here first, on a socket bound to 127.0.0.1, and torchrun, given the same port,
uses that server (TCPStore servers are shared per port within a process: `multi_tenant`). gloo and NCCL are
pointed at the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise. Across machines
use `accelerate launch` with an accelerate config on each one (docs/orchestration.md).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
STORE_TIMEOUT = datetime.timedelta(minutes=30)


def loopback_interface() -> str:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import TCPStore
    from torch.distributed.run import main as torchrun

    from dmd.core.process import stop_with_parent
    from dmd.wan.device import resolve_num_processes

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not (argv[0].isdigit() and int(argv[0]) >= 1 or argv[0] == "auto"):
        print(
            "usage: python -m dmd.training.launch NUM_PROCESSES|auto PARAMS_FILE [section.key=value ...]",
            file=sys.stderr,
        )
        return 2
    stop_with_parent()  # a killed train stage takes its launcher, and through it the workers, along
    num_processes, params_file, overrides = str(resolve_num_processes(argv[0])), argv[1], argv[2:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = TCPStore(  # noqa: F841 - held for the workers' lifetime; torchrun's own store on `port` is this one
        LOOPBACK, port, None, True, STORE_TIMEOUT, wait_for_workers=False, multi_tenant=True,
        master_listen_fd=listener.fileno(),
    )  # fmt: skip
    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    torchrun(
        [
            "--nproc_per_node", num_processes, "--nnodes", "1", "--rdzv_backend", "static",
            "--master_addr", LOOPBACK, "--master_port", str(port),
            "-m", "dmd.training.loop", params_file, *overrides,
        ]
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
