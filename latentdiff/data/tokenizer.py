"""Caption tokenizer: any Hugging Face tokenizer, or an uncased BERT-style WordPiece trained offline on the captions.

The trained tokenizer is saved with `save(dir)` (Hugging Face files) and reloaded with `load_tokenizer(dir, ...)`, so
sampling uses exactly the training vocabulary. (transformers 5: `BertTokenizerFast(vocab_file=...)` silently ignores
the vocabulary; we always load from a directory with `AutoTokenizer.from_pretrained`.)
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from latentdiff import config_utils
from latentdiff.data.errors import DataError, DataWarning

# transformers prints "PyTorch was not found. Models won't be available ..." when it is imported without PyTorch (the
# base install): latentdiff takes only tokenizers from it, which need none. That line is an "advisory" warning; this
# silences the advisories (set TRANSFORMERS_NO_ADVISORY_WARNINGS=0 to see them). Errors and other warnings still show.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

BERT_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """Wraps a Hugging Face tokenizer; encodes captions to fixed-length int32 ids [N, max_length].

    Sequences carry the tokenizer's special tokens ([CLS] ... [SEP] for BERT), are padded with `pad_id` and truncated
    to `max_length` (keeping the final special token); the first truncation warns once.

    Built by `from_tokenizer_file` (our own saved tokenizers), it encodes with the `tokenizers` library directly, as
    transformers' fast tokenizer does inside, and imports transformers (~1 s) only when `hf` is first used.
    """

    def __init__(self, hf_tokenizer, max_length: int, *, raw=None, pad_id: int | None = None, directory: str = ""):
        if max_length < 2:
            raise DataError(f"tokenizer max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self._hf, self._raw, self._directory = hf_tokenizer, raw, directory
        self.max_length = int(max_length)
        if pad_id is None:
            pad_id = hf_tokenizer.pad_token_id
            if pad_id is None:
                pad_id = hf_tokenizer.eos_token_id
            if pad_id is None:
                raise DataError(f"tokenizer {hf_tokenizer.name_or_path!r} has neither a pad nor an eos token")
        self.pad_id = int(pad_id)
        self._warned = False

    @classmethod
    def from_tokenizer_file(cls, directory: str, max_length: int) -> Tokenizer:
        """A saved fast tokenizer (tokenizer.json + tokenizer_config.json) read with `tokenizers` alone."""
        from tokenizers import Tokenizer as RawTokenizer

        config = config_utils.read_json_file(os.path.join(directory, "tokenizer_config.json"), "a tokenizer config")
        raw = RawTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        pad_id = None
        for field in ("pad_token", "eos_token"):
            token = config.get(field)
            token = token.get("content") if isinstance(token, dict) else token
            if pad_id is None and token is not None:
                pad_id = raw.token_to_id(token)
        if pad_id is None:
            raise DataError(f"tokenizer {directory!r} has neither a pad nor an eos token")
        raw.no_padding()
        return cls(None, max_length, raw=raw, pad_id=pad_id, directory=directory)

    @property
    def hf(self):
        """The transformers tokenizer (loaded on first use when built by `from_tokenizer_file`)."""
        if self._hf is None:
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(self._directory)
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are < vocab_size)."""
        if self._raw is not None:
            return self._raw.get_vocab_size(with_added_tokens=True)
        return len(self.hf)

    def _ids(self, captions: list[str], max_length: int) -> list[list[int]]:
        """Token ids with special tokens, truncated to max_length (right side, as transformers' truncation=True)."""
        if self._raw is None:
            return self.hf(captions, truncation=True, max_length=max_length)["input_ids"]
        self._raw.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        return [encoding.ids for encoding in self._raw.encode_batch(captions, add_special_tokens=True)]

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """Token ids int32 [N, max_length] for N captions ("" gives [CLS][SEP] + padding)."""
        captions = [str(c) for c in captions]
        out = np.full((len(captions), self.max_length), self.pad_id, np.int32)
        if not captions:
            return out
        # A generous first cut (finding the long ones without the library's "sequence too long" warning).
        ids = self._ids(captions, 4 * self.max_length + 16)
        long = [i for i, seq in enumerate(ids) if len(seq) > self.max_length]
        if long:
            short = self._ids([captions[i] for i in long], self.max_length)
            for i, seq in zip(long, short):
                ids[i] = seq
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{len(long)} caption(s) longer than max_length={self.max_length} tokens were truncated, "
                    f"e.g. {captions[long[0]][:80]!r} (warned once)",
                    DataWarning,
                    stacklevel=2,
                )
        for i, seq in enumerate(ids):
            out[i, : len(seq)] = seq
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        """Text for token ids [N, L] (special tokens and padding dropped)."""
        return [self.hf.decode([int(t) for t in row], skip_special_tokens=True) for row in np.asarray(ids)]

    def save(self, directory: str) -> None:
        """Writes the Hugging Face tokenizer files to `directory` (reload with load_tokenizer(directory, ...))."""
        os.makedirs(directory, exist_ok=True)
        self.hf.save_pretrained(directory)


def is_tokenizer_dir(directory: str) -> bool:
    """True when `directory` holds saved tokenizer files."""
    return os.path.isfile(os.path.join(directory, "tokenizer_config.json"))


FAST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")  # the classes our saved tokenizers name


def is_plain_fast_tokenizer(directory: str) -> bool:
    """True for a saved tokenizer whose class is one of FAST_TOKENIZER_CLASSES and which holds tokenizer.json: all
    of it is in that file (our own tokenizers are), so `tokenizers` reads it without transformers."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and os.path.isfile(os.path.join(directory, "tokenizer.json"))):
        return False
    return config_utils.read_json_file(config_path, "a tokenizer config").get("tokenizer_class") in (
        FAST_TOKENIZER_CLASSES
    )


def _from_pretrained(name_or_path: str, local_files_only: bool):
    """AutoTokenizer, except for our own saved tokenizers (FAST_TOKENIZER_CLASSES), which load directly: importing
    AutoTokenizer pulls in torch when it is installed (seconds)."""
    config_path = os.path.join(name_or_path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        tokenizer_class = config_utils.read_json_file(config_path, "a tokenizer config").get("tokenizer_class")
        if tokenizer_class in FAST_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)


HUB_PROBE_SECONDS = 3.0  # one TCP connection to the hub before a download, instead of ~50 s of retries offline


def hub_unavailable_reason(environ: dict[str, str] | None = None) -> str | None:
    """Why a Hugging Face download cannot work right now (HF_HUB_OFFLINE set, or the hub's host does not accept a
    connection within HUB_PROBE_SECONDS), or None. Behind a proxy (HTTPS_PROXY) the probe is skipped."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if env.get("HTTPS_PROXY") or env.get("https_proxy"):
        return None
    endpoint = urllib.parse.urlparse(env.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return f"{endpoint.hostname}:{port} is unreachable ({error.strerror or type(error).__name__})"
    return None


def load_tokenizer(name_or_path: str, max_length: int) -> Tokenizer:
    """A Hugging Face tokenizer by hub name (e.g. 'bert-base-uncased', needs it cached or online) or directory."""
    if not name_or_path:
        raise DataError("tokenizer name_or_path is empty; give a Hugging Face name or a directory")
    looks_local = name_or_path.startswith((os.sep, ".", "~")) or os.path.isdir(name_or_path)
    if looks_local and not is_tokenizer_dir(os.path.expanduser(name_or_path)):
        raise DataError(f"no tokenizer files (tokenizer_config.json) in directory {name_or_path!r}")
    name_or_path = os.path.expanduser(name_or_path)
    if looks_local and is_plain_fast_tokenizer(name_or_path):
        return Tokenizer.from_tokenizer_file(name_or_path, max_length)
    if not looks_local:  # a hub name: the local cache first; a download only when the hub can answer
        try:
            return Tokenizer(_from_pretrained(name_or_path, local_files_only=True), max_length)
        except (OSError, ValueError):
            reason = hub_unavailable_reason()
        if reason:
            raise DataError(
                f"tokenizer {name_or_path!r} is not in the Hugging Face cache and cannot be downloaded ({reason}): on "
                f"a machine with network run `hf download {name_or_path} --local-dir tokenizers/{name_or_path}`, "
                "copy that folder here and pass its path instead of the name"
            )
    try:
        hf = _from_pretrained(name_or_path, local_files_only=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load tokenizer {name_or_path!r}: not a directory with tokenizer files and not in the Hugging "
            f"Face cache (offline?): {first}"
        ) from None
    return Tokenizer(hf, max_length)


def train_wordpiece(captions: Iterable[str], vocab_size: int, max_length: int) -> Tokenizer:
    """Builds an uncased BERT-style WordPiece tokenizer from `captions` (deterministic: same captions, same ids).

    `tokenizers` supplies the BERT normaliser (lowercase, strip accents), pre-tokeniser, WordPiece model and
    [CLS] $A [SEP] post-processor. The vocabulary is chosen here rather than by `tokenizers.trainers.WordPieceTrainer`,
    whose tie-breaking follows a per-process random hash order, so two hosts or two runs would get different ids.
    Vocabulary: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; every character seen, alone and as "##" continuation
    (so no word is ever [UNK]); then whole words by descending count (ties alphabetical) up to `vocab_size`. Words
    left out are spelt with the longest matching pieces. Use `Tokenizer.vocab_size` (<= vocab_size) for the model.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(caption))))
    alphabet = sorted({ch for word in counts for ch in word})
    vocab = [*BERT_SPECIAL_TOKENS, *alphabet, *("##" + ch for ch in alphabet)]
    if len(vocab) > vocab_size:
        raise DataError(
            f"tokenizer vocab_size={vocab_size} is smaller than the {len(vocab)} special and character tokens the "
            "captions need; raise tokenizer.vocab_size"
        )
    taken = set(vocab)
    words = sorted((w for w in counts if w not in taken), key=lambda w: (-counts[w], w))
    vocab += words[: vocab_size - len(vocab)]
    raw = RawTokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizer
    raw.decoder = decoders.WordPiece(prefix="##")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        do_lower_case=True,
    )
    return Tokenizer(hf, max_length)
