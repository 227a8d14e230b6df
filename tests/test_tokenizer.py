"""Caption tokenizer: offline WordPiece against transformers' pure-Python BERT tokenizer, save/load, padding."""

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from transformers import AutoTokenizer
from transformers.models.bert import BertTokenizerLegacy

from latentdiff.data import shapes
from latentdiff.data.errors import DataError, DataWarning
from latentdiff.data.tokenizer import load_tokenizer, train_wordpiece

CORPUS = shapes.make_examples(400, 8, "train", 0)[1] + [
    "Café crème, naïve façade!",
    "A dog (brown) jumps over 2 fences; it's fast.",
]
PROBES = [
    "",
    "a small red circle at the top left",
    "A BIG Blue Triangle, on a WHITE background.",
    "café naïve dog fences",
    "unseen words like zebra and quux",
    "reddish circles",
]


L = 32


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(CORPUS, 120, L)


def test_matches_python_bert_reference(tok, tmp_path):
    """Same ids as transformers' pure-Python BertTokenizer (BasicTokenizer + greedy WordPiece) on our vocabulary."""
    vocab = sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    (tmp_path / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n", encoding="utf-8")
    ref = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    ids = tok.encode(PROBES)
    for row, text in zip(ids, PROBES):
        expected = ref(text, padding="max_length", max_length=L, truncation=True)["input_ids"]
        assert row.tolist() == expected, text


def test_special_tokens_padding_and_empty_caption(tok):
    ids = tok.encode(["", "red circle"])
    assert ids.dtype == np.int32 and ids.shape == (2, L)
    cls, sep = tok.hf.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert tok.pad_id == tok.hf.convert_tokens_to_ids("[PAD]") == 0
    assert ids[0, :2].tolist() == [cls, sep] and (ids[0, 2:] == tok.pad_id).all()
    assert ids[1, 0] == cls and ids[1, 3] == sep and (ids[1, 4:] == 0).all()
    assert tok.decode(ids) == ["", "red circle"]
    assert (ids < tok.vocab_size).all() and tok.vocab_size <= 120


def test_truncation_keeps_sep_and_warns_once():
    tok = train_wordpiece(CORPUS, 120, 16)  # fresh: the warning is once per tokenizer
    long = " ".join(["red circle"] * 20)
    with pytest.warns(DataWarning, match="truncated"):
        ids = tok.encode([long, "blue"])
    sep = tok.hf.convert_tokens_to_ids("[SEP]")
    assert ids.shape == (2, 16) and ids[0, -1] == sep and (ids[0] != tok.pad_id).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode([long])  # second truncation: silent


def test_save_load_round_trip_and_determinism(tok, tmp_path):
    tok.save(str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"), L)
    assert loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.encode(PROBES), tok.encode(PROBES))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))  # plain transformers sees the same vocabulary
    assert hf("red circle")["input_ids"] == tok.encode(["red circle"])[0, :4].tolist()
    again = train_wordpiece(CORPUS, 120, L)  # deterministic: same corpus, same ids (multi-host safe)
    assert again.hf.get_vocab() == tok.hf.get_vocab()
    clone = pickle.loads(pickle.dumps(tok))  # grain worker processes receive it pickled
    assert np.array_equal(clone.encode(PROBES), tok.encode(PROBES))


def test_bad_tokenizer_requests_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path), 16)
    with pytest.raises(DataError, match=r"'no-such-org/no-such-tokenizer' is not in the Hugging Face cache .*OFFLINE"):
        load_tokenizer("no-such-org/no-such-tokenizer", 16)  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(DataError, match="vocab_size=10"):
        train_wordpiece(CORPUS, 10, 16)


def test_a_hub_name_offline_fails_at_once_and_says_how_to_get_a_local_copy(monkeypatch):
    """Without HF_HUB_OFFLINE, an unreachable hub used to cost ~50 s of retries before the error."""
    import time

    from latentdiff.data.tokenizer import hub_unavailable_reason

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_tokenizer("bert-base-uncased", 77)
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "127.0.0.1:9 is unreachable" in message and "hf download bert-base-uncased --local-dir" in message
    assert "\n" not in message
    assert hub_unavailable_reason({"HF_HUB_OFFLINE": "1"}) == "HF_HUB_OFFLINE is set"
    assert hub_unavailable_reason({"HTTPS_PROXY": "http://proxy:3128", "HF_ENDPOINT": "http://127.0.0.1:9"}) is None


def test_no_pytorch_advisory_without_pytorch():
    """The base install has no PyTorch; transformers then printed "PyTorch was not found. Models won't be available"
    in every `make demo` and training run, although tokenizers need no PyTorch. (PyTorch hidden here as if absent.)"""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from latentdiff.data import tokenizer\n"
        "print(tokenizer.train_wordpiece(['a red circle', 'a blue square'], 64, 8).vocab_size)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and int(run.stdout) > 0, run.stderr
    assert "PyTorch was not found" not in run.stderr, run.stderr


def test_saved_tokenizers_encode_without_transformers_exactly_as_transformers(tok, tmp_path):
    """load_tokenizer reads our saved tokenizers with `tokenizers` alone (transformers costs ~1 s of every start):
    the same ids as the transformers tokenizer, truncation and unusual text included; `hf` still works, loaded late."""
    tok.save(str(tmp_path / "tok"))
    long = [" ".join(CORPUS[i : i + 12]) for i in range(0, 120, 12)]
    captions = [*PROBES, *CORPUS[:200], *long, "\u00a0tabs\tand\nnewlines", "emoji 🙂 and ｆｕｌｌ width", "x" * 300]
    for max_length in (L, 8):
        fast = load_tokenizer(str(tmp_path / "tok"), max_length)
        reference = type(fast)(AutoTokenizer.from_pretrained(str(tmp_path / "tok")), max_length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            np.testing.assert_array_equal(fast.encode(captions), reference.encode(captions))
        assert fast.pad_id == reference.pad_id and fast.vocab_size == reference.vocab_size
    clone = pickle.loads(pickle.dumps(fast))  # grain worker processes receive it pickled
    np.testing.assert_array_equal(clone.encode(PROBES), fast.encode(PROBES))
    assert fast.decode(fast.encode(["red circle"])) == ["red circle"]  # through `hf`, loaded on first use
    program = (
        "import sys; from latentdiff.data.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({str(tmp_path / 'tok')!r}, 8); t.encode(['red circle']); "
        "print('transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
