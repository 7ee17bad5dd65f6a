import json
import time

import pytest
import torch

from kd import assets
from kd.data.squad import postprocess_predictions, prepare_eval_features, prepare_train_features
from kd.data.squad_examples import SquadAnswer, SquadExample, load_squad, read_squad_json, squad_references
from kd.errors import KDError
from kd.hub import hub_reachable
from kd.metrics import squad_metrics

PORTS = ["Aldmere", "Brixham", "Corwen", "Dunmore", "Elgin", "Fairlie", "Girvan", "Harwich",
         "Ilfracombe", "Jarrow", "Keswick", "Lerwick", "Mallaig", "Newlyn", "Oban", "Padstow",
         "Queensferry", "Rosslare", "Stornoway", "Tobermory", "Ullapool", "Ventnor", "Whitby",
         "Yarmouth", "Zennor"]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(assets.minilm_path())


def long_context():
    """~1000 tokens of distinct sentences, so that answers land in different windows."""
    sentences = []
    for i in range(60):
        port = PORTS[i % len(PORTS)]
        sentences.append(f"In {1801 + i} the harbour at {port} handled {3000 + 17 * i} ships "
                         f"carrying grain and timber.")
    return " ".join(sentences)


def example_at(context, qid, answer, question="How many ships did the harbour handle?"):
    start = context.index(answer)
    return SquadExample(qid, question, context, [SquadAnswer(answer, start)])


def context_char_range(offsets, sequence_ids):
    positions = [i for i, s in enumerate(sequence_ids) if s == 1]
    return offsets[positions[0]][0], offsets[positions[-1]][1]


def test_windows_label_answers_and_map_back_exactly(tokenizer):
    context = long_context()
    # windows (384 tokens, stride 128) cover context chars 0-1735, 1147-2872, 2277-3991, 3412-4623
    answers = {"first": "3017 ships", "second": "3476 ships", "third": "3680 ships",
               "overlap": "3357 ships", "last": "4003 ships"}
    examples = [example_at(context, qid, text) for qid, text in answers.items()]
    features = prepare_train_features(examples, tokenizer, max_length=384, doc_stride=128)
    # recompute the windows to read their offsets (prepare_train_features returns tensors only)
    encoded = tokenizer([e.question for e in examples], [context] * len(examples), truncation="only_second",
                        max_length=384, stride=128, return_overflowing_tokens=True,
                        return_offsets_mapping=True, padding="max_length")
    assert features["input_ids"].tolist() == encoded["input_ids"]
    n_windows = encoded["overflow_to_sample_mapping"].count(0)
    assert n_windows == 4
    assert features["input_ids"].shape == (len(examples) * n_windows, 384)

    containing = {}
    for window, sample in enumerate(encoded["overflow_to_sample_mapping"]):
        example = examples[sample]
        answer = example.answers[0]
        offsets = encoded["offset_mapping"][window]
        lo, hi = context_char_range(offsets, encoded.sequence_ids(window))
        inside = lo <= answer.start and answer.start + len(answer.text) <= hi
        start = int(features["start_positions"][window])
        end = int(features["end_positions"][window])
        if inside:
            assert context[offsets[start][0]:offsets[end][1]] == answer.text
            assert encoded.sequence_ids(window)[start] == 1 and end >= start
            containing.setdefault(example.id, []).append(window % n_windows)
        else:
            assert (start, end) == (0, 0)
    # each answer is labelled in exactly the windows that hold it, including both windows of an overlap
    assert containing == {"first": [0], "second": [1], "third": [2], "overlap": [0, 1], "last": [3]}


def test_eval_features_round_trip_through_postprocessing(tokenizer):
    context = long_context()
    examples = [example_at(context, "q1", "Ullapool"), example_at(context, "q2", "4003 ships")]
    features = prepare_eval_features(examples, tokenizer, max_length=384, doc_stride=128)
    train = prepare_train_features(examples, tokenizer, max_length=384, doc_stride=128)
    assert len(features) == features.tensors["input_ids"].shape[0] == len(train["start_positions"])
    assert features.example_ids == [examples[i].id for i in train["example_index"].tolist()]
    for window, offsets in enumerate(features.offset_mapping):
        assert offsets[0] is None                                  # [CLS]
        question_len = len(tokenizer(examples[0].question, add_special_tokens=False)["input_ids"])
        assert all(o is None for o in offsets[:question_len + 2])  # [CLS] question [SEP]
        assert any(o is not None for o in offsets)
    # logits peaked at the gold span of the window that holds the answer -> the exact answer text
    start_logits = torch.zeros(len(features), 384)
    end_logits = torch.zeros(len(features), 384)
    for window in range(len(features)):
        s, e = int(train["start_positions"][window]), int(train["end_positions"][window])
        if (s, e) != (0, 0):
            start_logits[window, s] = 10.0
            end_logits[window, e] = 10.0
    predictions = postprocess_predictions(examples, features, start_logits, end_logits)
    assert predictions == {"q1": "Ullapool", "q2": "4003 ships"}
    # tokenising in chunks (to bound memory on all of SQuAD) changes nothing
    chunked = prepare_eval_features(examples, tokenizer, chunk_size=1)
    assert chunked.example_ids == features.example_ids
    assert chunked.offset_mapping == features.offset_mapping
    assert torch.equal(chunked.tensors["input_ids"], features.tensors["input_ids"])
    chunked_train = prepare_train_features(examples, tokenizer, chunk_size=1)
    assert all(torch.equal(chunked_train[key], train[key]) for key in train)


def test_postprocessing_respects_question_and_max_answer_length(tokenizer):
    context = "The bridge over the river Tay was opened in 1878 and collapsed in a storm in 1879."
    question = "When was the bridge opened?"
    example = SquadExample("q", question, context, [SquadAnswer("1878", context.index("1878"))])
    features = prepare_eval_features([example], tokenizer, max_length=64, doc_stride=16,
                                     max_query_length=16)
    offsets = features.offset_mapping[0]
    ids = features.tensors["input_ids"][0].tolist()
    token = {tokenizer.convert_ids_to_tokens(i): pos for pos, i in enumerate(ids)
             if offsets[pos] is not None}
    first_ctx = next(i for i, o in enumerate(offsets) if o is not None)
    last_ctx = max(i for i, o in enumerate(offsets) if o is not None)
    assert offsets[1] is None and ids[1] == tokenizer.convert_tokens_to_ids("when")

    start = torch.full((1, 64), -5.0)
    end = torch.full((1, 64), -5.0)
    start[0, 1], end[0, 2] = 50.0, 50.0                  # a span inside the question: rejected
    start[0, token["1878"]], end[0, token["1878"]] = 20.0, 20.0
    end[0, token["bridge"]] = 30.0                       # ends before the start "1878": rejected
    assert postprocess_predictions([example], features, start, end) == {"q": "1878"}
    # n_best=1 keeps only the top start and end (the question span) -> no valid span -> ""
    assert postprocess_predictions([example], features, start, end, n_best=1) == {"q": ""}

    start = torch.full((1, 64), -5.0)
    end = torch.full((1, 64), -5.0)
    start[0, first_ctx], end[0, last_ctx] = 40.0, 40.0   # the whole context: too long for 5 tokens
    start[0, token["1878"]], end[0, token["1878"]] = 20.0, 20.0
    assert postprocess_predictions([example], features, start, end, max_answer_length=5) == {"q": "1878"}
    # with a generous limit the whole-context span wins, mapped back to the original text
    whole = postprocess_predictions([example], features, start, end, max_answer_length=64)
    assert whole == {"q": context}


def test_squad_metrics_hand_checked():
    predictions = {"a": "the Eiffel Tower", "b": "Paris France"}
    references = {"a": ["Eiffel Tower", "the tower"], "b": ["Paris"]}
    scores = squad_metrics(predictions, references)
    # a: exact after normalisation (article dropped). b: P=1/2, R=1 -> F1 2/3, not exact.
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx((100 + 200 / 3) / 2)
    # a missing prediction scores 0, as in the official script
    with pytest.warns(UserWarning, match="Unanswered question b"):
        partial = squad_metrics({"a": "Eiffel Tower."}, references)
    assert partial == pytest.approx({"exact_match": 50.0, "f1": 50.0})


def write_squad(tmp_path, answer_start, extra_qas=()):
    context = "Normandy is a region in France. The Normans gave their name to it."
    doc = {"version": "1.1", "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": [
        {"id": "good1", "question": "Where is Normandy?",
         "answers": [{"text": "France", "answer_start": context.index("France")}]},
        {"id": "bad1", "question": "Who gave their name?",
         "answers": [{"text": "The Normans", "answer_start": answer_start}]},
        *extra_qas]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    return path, context


def test_local_squad_json_loads(tmp_path):
    path, context = write_squad(tmp_path, answer_start=32)
    data = load_squad("files", validation_file=str(path))
    examples = data.splits["validation"]
    assert [e.id for e in examples] == ["good1", "bad1"] and data.skipped == {}
    assert squad_references(examples) == {"good1": ["France"], "bad1": ["The Normans"]}
    assert examples[0].title == "Normans"


def test_answer_start_mismatch_error_and_skip(tmp_path):
    path, context = write_squad(tmp_path, answer_start=30)
    with pytest.raises(KDError) as err:
        read_squad_json(str(path))
    message = str(err.value)
    assert "bad1" in message and "'The Normans'" in message
    assert repr(context[30:30 + len("The Normans")]) in message and "on_bad_row=skip" in message
    examples, skipped, notes = read_squad_json(str(path), on_bad_row="skip")
    assert [e.id for e in examples] == ["good1"]
    assert skipped == {"answer_mismatch": 1, "no_answer": 1} and len(notes) == 2


def test_squad_file_problems(tmp_path):
    with pytest.raises(KDError, match="not found: .*missing.json"):
        read_squad_json(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(KDError, match="expected SQuAD v1.1 JSON"):
        read_squad_json(str(tmp_path / "list.json"))
    path, _ = write_squad(tmp_path, 32, extra_qas=[{"id": "good1", "question": "Again?",
                                                    "answers": [{"text": "France", "answer_start": 24}]}])
    with pytest.raises(KDError, match="'good1' appears more than once"):
        read_squad_json(str(path))


@pytest.mark.skipif(hub_reachable(), reason="the Hugging Face hub is reachable; this checks offline behaviour")
def test_hub_squad_fails_fast_offline():
    began = time.monotonic()
    with pytest.raises(KDError, match="dataset 'squad'.*data.source=files"):
        load_squad("hub")
    assert time.monotonic() - began < 15
