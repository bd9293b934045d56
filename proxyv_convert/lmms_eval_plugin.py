"""The `lmms_eval.models` entry point (`pip install "proxyv[lmms-eval]"`): lmms-eval evaluates a ProxyV model as
`--model proxyv`, with the classes of `lmms_eval_model.py`. Kept apart from them because lmms-eval loads every entry
point at start: this imports nothing heavy, and the model module is imported only when `proxyv` is asked for."""

MODEL_MODULE = "proxyv_convert.lmms_eval_model"


def manifest():
    """lmms-eval's model manifest: a chat model only (`--force_simple` runs it too; see `lmms_eval_model.ProxyV`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="proxyv", chat_class_path=f"{MODEL_MODULE}.ProxyV")
