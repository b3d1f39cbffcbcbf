"""The model at run time: ONNX Runtime sessions (`engine`), image decoding and heat maps
(`imaging`), tiling of large images (`tiling`), the metadata that travels with a model
(`metadata`) and where a number was measured (`hardware`). The one pre/post-processing path
shared by evaluation (registry/) and serving."""
