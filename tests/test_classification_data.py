import time

import pytest
import torch

from kd import assets
from kd.data import classification as cls
from kd.data.classification import ClassificationDataset, PadCollate, encode, load_classification_splits
from kd.data.example_files import read_examples_file
from kd.data.tasks import Example, get_task
from kd.errors import KDError
from kd.hub import hub_reachable
from kd.metrics import classification_metrics

SST2 = get_task("sst2")


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(assets.minilm_path())


@pytest.fixture(scope="module")
def tweets():
    return load_classification_splits("tweets", "sst2", seed=0)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_tsv_csv_jsonl_read_the_same_examples(tmp_path):
    tsv = write(tmp_path, "train.tsv", 'sentence\tlabel\na "gripping" film \t1\ndull , dull\t0\n')
    csv = write(tmp_path, "dev.csv", 'sentence,label\n"a ""gripping"" film",positive\n"dull , dull",0\n')
    jsonl = write(tmp_path, "test.jsonl", '{"sentence": "a \\"gripping\\" film", "label": 1}\n\n'
                                          '{"sentence": "dull , dull", "label": "negative"}\n')
    data = load_classification_splits("files", "sst2", train_file=tsv, validation_file=csv,
                                      test_file=jsonl)
    expected = [Example('a "gripping" film', None, 1), Example("dull , dull", None, 0)]
    assert data.splits == {"train": expected, "validation": expected, "test": expected}
    assert data.skipped == {} and data.split_sizes == {"train": 2, "validation": 2, "test": 2}


def test_pair_task_with_configured_columns(tmp_path):
    path = write(tmp_path, "rte.tsv", "index\tfirst\tsecond\tgold\n0\tA cat sat.\tAn animal sat.\tentailment\n"
                                      "1\tIt rained.\tIt was dry.\t1\n")
    examples, skipped, _ = read_examples_file(path, get_task("rte"), text_columns=["first", "second"],
                                              label_column="gold")
    assert examples == [Example("A cat sat.", "An animal sat.", 0), Example("It rained.", "It was dry.", 1)]


def test_out_of_set_label_error_names_file_line_and_value(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nodd\t2\nfine\tmaybe\n")
    with pytest.raises(KDError) as err:
        load_classification_splits("files", "sst2", train_file=path)
    message = str(err.value)
    assert f"{path}:3" in message and "'2'" in message and "on_bad_row=skip" in message
    assert "['negative', 'positive']" in message


def test_skip_mode_counts_every_kind_of_bad_row(tmp_path):
    content = (b"sentence\tlabel\ngood\t1\nodd\t2\ncaf\xe9 au lait\t0\nno label field\n"
               b"\t1\nbad\tmaybe\nfine\t0\n")
    path = write(tmp_path, "train.tsv", content)
    with pytest.raises(KDError, match=r"train.tsv:4: bytes that are not UTF-8"):
        load_classification_splits("files", "sst2", train_file=path, validation_file=path,
                                   on_bad_row="error")
    data = load_classification_splits("files", "sst2", train_file=path, on_bad_row="skip")
    assert data.splits["train"] == [Example("good", None, 1), Example("fine", None, 0)]
    assert data.skipped == {"train": {"bad_label": 2, "undecodable_bytes": 1, "malformed_row": 1,
                                      "empty_text": 1}}
    assert data.total_skipped == 5 and len(data.notes) == 5
    assert any("train.tsv:7: label 'maybe'" in note for note in data.notes)


def test_missing_column_lists_columns_found(tmp_path):
    path = write(tmp_path, "train.csv", "text,polarity\nnice,1\n")
    with pytest.raises(KDError) as err:
        load_classification_splits("files", "sst2", train_file=path)
    message = str(err.value)
    assert "['sentence', 'label']" in message and "['text', 'polarity']" in message
    assert "label_column" in message
    # ... which the column options fix
    data = load_classification_splits("files", "sst2", train_file=path, text_columns=["text"],
                                      label_column="polarity")
    assert data.splits["train"] == [Example("nice", None, 1)]


def test_missing_and_empty_files(tmp_path):
    missing = str(tmp_path / "nope.tsv")
    with pytest.raises(KDError, match=f"not found: {missing}"):
        load_classification_splits("files", "sst2", train_file=missing)
    with pytest.raises(KDError, match="is empty"):
        load_classification_splits("files", "sst2", train_file=write(tmp_path, "e.tsv", "\n"))
    with pytest.raises(KDError, match="no data rows"):
        load_classification_splits("files", "sst2", train_file=write(tmp_path, "h.tsv", "sentence\tlabel\n"))
    with pytest.raises(KDError, match="needs data.train=PATH"):
        load_classification_splits("files", "sst2")
    with pytest.raises(KDError, match="unknown classification task 'sst3'"):
        load_classification_splits("files", "sst3", train_file=missing)
    with pytest.raises(KDError, match="on_bad_row='ignore'"):
        load_classification_splits("tweets", "sst2", on_bad_row="ignore")


def test_unlabelled_test_file_is_allowed_only_for_test(tmp_path):
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\tsome film\n")
    data = load_classification_splits("files", "sst2", test_file=path)
    assert data.splits["test"] == [Example("some film", None, -1)]
    with pytest.raises(KDError, match="has no train or validation split.*data.train=PATH data.validation=PATH"):
        data.require("train", "validation")
    with pytest.raises(KDError, match=r"missing column\(s\) \['label'\]"):
        load_classification_splits("files", "sst2", train_file=path)


def test_tweets_split_deterministic_disjoint_and_complete(tweets):
    again = load_classification_splits("tweets", "sst2", seed=0)
    assert again.splits == tweets.splits
    other = load_classification_splits("tweets", "sst2", seed=1)
    assert other.splits["validation"] != tweets.splits["validation"]

    texts = {name: {e.text for e in rows} for name, rows in tweets.splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    sizes = tweets.split_sizes
    assert all(len(texts[name]) == sizes[name] for name in sizes)   # no repeats within a split

    skipped = tweets.skipped["all"]
    assert skipped["neutral"] == 15018                        # DESIGN §3: 15,018 neutral tweets
    total_pos_neg = 16186 + 6954
    assert sum(sizes.values()) + skipped["duplicate_text"] + skipped["conflicting_labels"] == total_pos_neg
    assert sizes["validation"] == pytest.approx(0.1 * sum(sizes.values()), abs=2)
    assert {e.label for rows in tweets.splits.values() for e in rows} == {0, 1}
    assert tweets.summary()["seed"] == 0 and tweets.summary()["split_sizes"] == sizes
    # stratified: the positive share is the same in every split (about 30%)
    shares = [sum(e.label for e in rows) / len(rows) for rows in tweets.splits.values()]
    assert max(shares) - min(shares) < 0.01


def test_pang_lee_smoke_source():
    data = load_classification_splits("pang-lee", "sst2", seed=3)
    assert data.split_sizes == {"train": 160, "validation": 20, "test": 20}
    assert data.label_counts()["validation"] == {"negative": 10, "positive": 10}
    # the file is cp1252; its em dashes must come through as text, not mojibake or errors
    assert any("\u2014" in e.text for rows in data.splits.values() for e in rows)
    with pytest.raises(KDError, match="does not fit task mrpc"):
        load_classification_splits("pang-lee", "mrpc")


def test_encode_and_dynamic_padding(tokenizer):
    examples = [Example("a gripping film", None, 1), Example("dull", None, 0)]
    batch = encode(examples, tokenizer, max_length=16)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, 5)            # [CLS] a gripping film [SEP], padded to it
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["labels"].tolist() == [1, 0]

    pairs = [Example("A cat sat.", "An animal sat down on the mat.", 0)]
    dataset = ClassificationDataset(pairs * 3, tokenizer, max_length=8)
    item = dataset[0]
    assert len(item["input_ids"]) == 8 and dataset.num_at_max_length == 3
    assert item["token_type_ids"][0] == 0 and item["token_type_ids"][-1] == 1
    collated = PadCollate(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert collated["token_type_ids"].shape == (2, 8)


def test_classification_metrics_hand_checked():
    preds = torch.tensor([1, 1, 0, 0])
    labels = torch.tensor([1, 0, 0, 1])
    scores = classification_metrics(["accuracy", "f1", "matthews"], preds, labels, num_labels=2)
    # tp=1 fp=1 fn=1: F1 = 2/(2+1+1) = 0.5; MCC = (1*1 - 1*1)/... = 0
    assert scores == pytest.approx({"accuracy": 50.0, "f1": 50.0, "matthews": 0.0})


def test_hub_errors_are_wrapped_with_offline_options(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(cls, "prepare_hub_access", lambda: True)
    with pytest.raises(KDError) as err:
        load_classification_splits("hub", "sst2")
    message = str(err.value)
    assert "'glue/sst2'" in message and "Couldn't reach" in message
    assert "data.source=tweets" in message and "data.source=files" in message


@pytest.mark.skipif(hub_reachable(), reason="the Hugging Face hub is reachable; this checks offline behaviour")
def test_hub_fails_fast_offline():
    began = time.monotonic()
    with pytest.raises(KDError, match="'glue/sst2'.*data.source=tweets"):
        load_classification_splits("hub", "sst2")
    assert time.monotonic() - began < 15
