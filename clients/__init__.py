"""What runs beside the MES: the MES hot folder (`hotfolder`), on top of the SDK
(`clients/edge_anomaly_client`, importable as `edge_anomaly_client`)."""
