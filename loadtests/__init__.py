"""Load tests and serving benchmarks."""

import os

# Every process this package starts is fork + exec (`subprocess`), never a bare fork. gRPC's
# fork handlers, installed when a channel or server exists, can deadlock `subprocess.Popen` in
# the parent inside fork() (grpc/grpc#37259; seen here: a test run hung starting a gateway).
# Turned off before anything imports grpc; an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
