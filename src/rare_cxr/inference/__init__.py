"""Use a trained model on new images: the model bundle, reading PNG/JPEG/DICOM files into the
pixels the model was trained on, batched prediction with Grad-CAM, the model card, ONNX export.

Why a package of plain modules: the Kedro pipelines `inference` and `onnx_export`
(`rare_cxr.pipelines.inference`) stay thin wrappers, and tests, notebooks and benchmarks call
the same functions directly. Nothing here needs the training data: the bundle
(`rare_cxr.inference.bundle`) carries everything inference uses.
"""
