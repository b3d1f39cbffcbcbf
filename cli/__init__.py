"""The `anomaly` command, on top of every layer: the only package that imports them all.

One module per command group (`client`: score, models, hotfolder; `serve`: serve, gateway,
inspections-export; `bench`: bench, providers-check, soak; `train`: sample-data, train;
`studies`: compare, quant-study, demo), mounted by `cli.main` when their extras are
installed. Each command parses its options and calls the layer that does the work.
"""

import os

# Every process this package starts is fork + exec (`subprocess`), never a bare fork. gRPC's
# fork handlers, installed when a channel or server exists, can deadlock `subprocess.Popen` in
# the parent inside fork() (grpc/grpc#37259; seen here: a test run hung starting a gateway).
# Turned off before anything imports grpc; an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
