"""The transport-agnostic data plane (`data_plane`): score, list and describe models, with the
dynamic batcher (`batcher`) and the byte budget of admitted work (`budget`). Every protocol
translator calls it."""
