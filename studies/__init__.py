"""Studies behind this repository's results, built on the registry core, the served model and
its clients: the end-to-end demo, unified vs one-class, the quantization study and the
serving memory footprint."""
