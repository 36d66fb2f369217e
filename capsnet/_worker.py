"""Entry point of a replica worker process (:mod:`capsnet.processes`):
``python -m capsnet._worker SOCKET_FD PARAMS_FD GRADS_FD``, started by
:class:`capsnet.processes.ProcessReplicas` with those descriptors inherited."""
import sys

from capsnet.processes import serve

if __name__ == "__main__":
    serve(*(int(a) for a in sys.argv[1:4]))
