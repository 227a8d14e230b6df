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
    """

    def __init__(self, hf_tokenizer, max_length: int):
        if max_length < 2:
            raise DataError(f"tokenizer max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        pad = hf_tokenizer.pad_token_id
        if pad is None:
            pad = hf_tokenizer.eos_token_id
        if pad is None:
            raise DataError(f"tokenizer {hf_tokenizer.name_or_path!r} has neither a pad nor an eos token")
        self.pad_id = int(pad)
        self._warned = False

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are < vocab_size)."""
        return len(self.hf)

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """Token ids int32 [N, max_length] for N captions ("" gives [CLS][SEP] + padding)."""
        captions = [str(c) for c in captions]
        out = np.full((len(captions), self.max_length), self.pad_id, np.int32)
        if not captions:
            return out
        # A generous first cut (finding the long ones without the library's "sequence too long" warning).
        ids = self.hf(captions, truncation=True, max_length=4 * self.max_length + 16)["input_ids"]
        long = [i for i, seq in enumerate(ids) if len(seq) > self.max_length]
        if long:
            short = self.hf([captions[i] for i in long], truncation=True, max_length=self.max_length)["input_ids"]
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


def _from_pretrained(name_or_path: str, local_files_only: bool):
    """AutoTokenizer, except for our own saved tokenizers (class TokenizersBackend / PreTrainedTokenizerFast), which
    load directly: importing AutoTokenizer pulls in torch when it is installed (seconds)."""
    config_path = os.path.join(name_or_path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        tokenizer_class = config_utils.read_json_file(config_path, "a tokenizer config").get("tokenizer_class")
        if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
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
