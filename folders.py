"""What the scripts read off a folder before anything heavy is imported: a model folder's config.json, and where
this Python environment keeps DeepSpeed's compiled ops. Nothing here imports torch, transformers or DeepSpeed, so
a wrong path is said in a second, not after minutes of imports and op builds."""
import hashlib
import json
import os
import sys


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the path."""


def read_config_json(model_dir):
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"{model_dir}: model folder not found")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: missing; a model folder holds config.json, the tokenizer and the weights")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None


def use_own_extension_builds():
    """DeepSpeed compiles its ops (the CPU communication op on every CPU run) into torch's extension folder, by
    default one per user: two virtual environments on a machine then rebuild each other's ops at every start
    (minutes each). This environment gets a folder of its own, unless TORCH_EXTENSIONS_DIR is set."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache, "torch_extensions", f"env-{environment}"))
    return os.environ["TORCH_EXTENSIONS_DIR"]


def readable_by_others(folder):
    """Give the files under `folder` the usual permissions (0666 less the umask): safetensors writes them 0600, which
    other accounts (a serving process, a colleague) cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o777 == 0o600:
                os.chmod(path, 0o666 & ~umask)


if __name__ == "__main__":  # the extension folder, for tools/prepare_test_machine.sh
    print(use_own_extension_builds())
