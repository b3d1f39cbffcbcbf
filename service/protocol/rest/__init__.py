"""HTTP: the FastAPI gateway's `/v1` routes (`gateway`), the Open Inference Protocol's `/v2`
routes (`oip`), forwarding to gRPC and error answers (`forwarding`), bounded bodies (`http_body`)."""
