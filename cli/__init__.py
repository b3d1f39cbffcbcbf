"""The `anomaly` command, on top of every layer: the only package that imports them all.

One module per command group (`client`: score, models, hotfolder; `serve`: serve, gateway,
inspections-export; `bench`: bench, providers-check, soak; `train`: sample-data, train;
`studies`: compare, quant-study, demo), mounted by `cli.main` when their extras are
installed. Each command parses its options and calls the layer that does the work.
"""
