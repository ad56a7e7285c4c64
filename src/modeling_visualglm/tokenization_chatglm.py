"""ChatGLM-6B's ``ice_text`` SentencePiece tokenizer, rewritten for transformers 5.x.

Implements the tokenizer of ChatGLM-6B / VisualGLM-6B (GLM: Du et al., 2022, "GLM: General Language Model
Pretraining with Autoregressive Blank Infilling"). Behaviour follows THUDM's HF ``tokenization_chatglm.py``
(Hub ``THUDM/chatglm-6b``; git mirror greensheng/chatglm-6b, branch ``main`` @8b7d335, identical on the
``visual`` branch = ``THUDM/visualglm-6b``) with ``num_image_tokens=0`` as set by both ``tokenizer_config.json``:

- Before SentencePiece: "\\n" → ``<n>``, "\\t" → ``<|tab|>``, each run of k spaces → ``<|blank_k|>`` (runs longer
  than 80 are cut into 80s from the left, a remainder of one stays a space). Those pieces are USER_DEFINED in
  ``ice_text.model``, so SentencePiece keeps them whole. Every separately encoded string gets SentencePiece's
  dummy prefix ``▁``.
- Decoding runs SentencePiece, then undoes the three substitutions; pad ids are dropped. ``[MASK]``,
  ``[gMASK]``, ``<sop>``, ``<eop>`` … are CONTROL pieces of the model, so SentencePiece decodes them to nothing,
  with or without ``skip_special_tokens`` (as the original).
- ``build_inputs_with_special_tokens(a, b)`` = ``a + [gMASK, <sop>]`` (+ ``b + [<eop>]``); left padding.
- Every id is read from the SentencePiece model; nothing is hard-coded.

Deliberate differences from the original:
- All state (the SentencePiece processor, its vocabulary) exists before ``super().__init__``; the original set
  ``self.sp_tokenizer`` afterwards and crashes on transformers ≥ 4.34 (VisualGLM-6B #285, #323, #333).
- An extra special token ``<image>`` with id = the model's piece count (the first id after the pieces;
  SentencePiece never produces it). It is the dedicated image placeholder every family uses: the originals
  filled the 32 image slots with ``<unk>`` (HF) or ``<pad>`` (SAT), which ``generate()`` and losses confuse with
  real tokens. The model replaces the embeddings at these positions before any lookup; for the real model
  the id is 130344 < 130528 embedding rows, so it is even a valid row.
- ``[gMASK]`` and ``[sMASK]`` typed into text become their special token (the original only matched
  ``[MASK]``, ``<sop>``, ``<eop>``, ``<pad>``, ``<unk>``, its named specials); special tokens do not strip the
  spaces around them (transformers 4.27 stripped them for string specials). That is for callers who write
  control tokens on purpose: text from users goes through ``split_special_tokens=True`` (the prompt builders
  do this), where every special string is plain SentencePiece text. The specials are CONTROL pieces, which
  SentencePiece never produces from text, so such text never yields a control id; it decodes back to itself
  except for the literal strings ``<n>``, ``<|tab|>`` and ``<|blank_k|>``, which are the whitespace pieces
  (USER_DEFINED) and decode to "\\n", "\\t" and k spaces, as in the original.
- No ``position_ids``/3D mask from ``_pad``: the model derives ChatGLM's 2D positions and prefix mask from
  ``input_ids`` and the 2D padding mask. No ``icetk`` image ids (``num_image_tokens`` is 0 in
  every released config and is ignored here).
- Ids that name no piece and no added token raise a ``ValueError`` in ``decode`` instead of an ``IndexError``
  deep inside SentencePiece (ChatGLM-6B #987: the embedding has 184 rows more than the vocabulary).
"""

from __future__ import annotations

import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

from .compat import set_extra_special_tokens

VOCAB_FILES_NAMES = {"vocab_file": "ice_text.model"}

MAX_BLANK_LENGTH = 80
TAB_TOKEN = "<|tab|>"
NEWLINE_TOKEN = "<n>"
IMAGE_TOKEN = "<image>"

_SPACE_RUN = re.compile(r" {2,}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


def _encode_space_run(match: re.Match) -> str:
    # same result as the original replace loop over k = 80..2: whole 80s from the left, then the rest
    full, rest = divmod(len(match.group()), MAX_BLANK_LENGTH)
    tail = blank_token(rest) if rest >= 2 else " " * rest
    return blank_token(MAX_BLANK_LENGTH) * full + tail


def preprocess_text(text: str) -> str:
    """ice_text's whitespace encoding, applied before SentencePiece (newlines, tabs, then space runs)."""
    text = text.replace("\n", NEWLINE_TOKEN).replace("\t", TAB_TOKEN)
    return _SPACE_RUN.sub(_encode_space_run, text)


def _decode_blank(match: re.Match) -> str:
    length = int(match.group(1))
    return " " * length if 2 <= length <= MAX_BLANK_LENGTH else match.group()


def postprocess_text(text: str) -> str:
    """Inverse of :func:`preprocess_text` on decoded text."""
    text = text.replace(NEWLINE_TOKEN, "\n").replace(TAB_TOKEN, "\t")
    return _BLANK_TOKEN.sub(_decode_blank, text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of ChatGLM-6B (``ice_text.model``) with ChatGLM's whitespace pieces, the GLM
    specials and a dedicated ``<image>`` placeholder. ``tokenizer(text)`` → ids ending in ``[gMASK], <sop>``."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<sop>",
        eos_token="<eop>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        smask_token="[sMASK]",
        image_token=IMAGE_TOKEN,
        do_lower_case=False,
        remove_space=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        # Everything the base __init__ may call (get_vocab, _convert_token_to_id, …) must exist first.
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(os.fspath(vocab_file))
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self._sp_vocab = {self.sp_model.IdToPiece(i): i for i in range(self.sp_model.GetPieceSize())}
        specials = dict(unk_token=unk_token, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token,
                        mask_token=mask_token, gmask_token=gmask_token, smask_token=smask_token)
        self._check_pieces(specials, image_token)
        self._added_tokens_decoder = self._pinned_decoder(
            kwargs.pop("added_tokens_decoder", None) or {}, specials.values(), image_token
        )

        super().__init__(
            **specials,
            image_token=image_token,
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        set_extra_special_tokens(self, gmask_token=gmask_token, smask_token=smask_token, image_token=image_token)

    def _check_pieces(self, specials: dict, image_token) -> None:
        """The specials must be pieces of the SentencePiece model; ``<image>`` must not be one."""
        for name, piece in specials.items():
            if str(piece) not in self._sp_vocab:
                raise ValueError(
                    f"{name}={str(piece)!r} is not a piece of {self.vocab_file}; is this ChatGLM's ice_text.model?"
                )
        if str(image_token) in self._sp_vocab:
            raise ValueError(f"image_token={str(image_token)!r} must not be a SentencePiece piece of {self.vocab_file}")

    def _pinned_decoder(self, saved: dict, specials, image_token) -> dict:
        """Specials keep their SentencePiece ids; ``<image>`` takes the first id after the pieces. Passing them as
        the added-token table up front pins those ids (a saved tokenizer_config.json passes the same table)."""
        decoder = {int(k): (AddedToken(**v) if isinstance(v, dict) else v) for k, v in saved.items()}
        for piece in specials:
            decoder.setdefault(self._sp_vocab[str(piece)], _special(piece))
        image_id = self.sp_model.GetPieceSize()
        if image_id in decoder and str(decoder[image_id]) != str(image_token):
            raise ValueError(f"id {image_id} is reserved for {str(image_token)!r}, found {str(decoder[image_id])!r}")
        decoder[image_id] = _special(image_token)
        return {k: (AddedToken(v) if isinstance(v, str) else v) for k, v in decoder.items()}

    # ---- vocabulary -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (130344 for the real model); ``len(tokenizer)`` adds ``<image>``."""
        return self.sp_model.GetPieceSize()

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._sp_vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index: int) -> str:
        n_pieces = self.sp_model.GetPieceSize()
        if not 0 <= index < n_pieces:
            extra = sorted(i for i in self._added_tokens_decoder if i >= n_pieces)
            raise ValueError(
                f"token id {index} is outside the vocabulary: SentencePiece ids 0..{n_pieces - 1} and added ids {extra}"
            )
        return self.sp_model.IdToPiece(index)

    @property
    def gmask_token_id(self) -> int:
        return self.convert_tokens_to_ids(str(self.gmask_token))

    @property
    def smask_token_id(self) -> int:
        return self.convert_tokens_to_ids(str(self.smask_token))

    @property
    def sop_token_id(self) -> int:
        return self.bos_token_id

    @property
    def eop_token_id(self) -> int:
        return self.eos_token_id

    @property
    def image_token_id(self) -> int:
        return self.convert_tokens_to_ids(str(self.image_token))

    # ---- encoding ---------------------------------------------------------------------------------------

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # Called once per stretch of text between added tokens, so each stretch gets its own "▁" prefix,
        # exactly like the original's separate encode() calls around the image.
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp_model.EncodeAsPieces(preprocess_text(text))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """``a + [gMASK, <sop>]``, or ``a + [gMASK, <sop>] + b + [<eop>]`` for a pair (prompt, answer)."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.sop_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eop_token_id]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ---- decoding ---------------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run = [], []
        for token in tokens:
            if token in self._sp_vocab:
                run.append(token)
                continue
            if run:
                out.append(postprocess_text(self.sp_model.DecodePieces(run)))
                run = []
            out.append(token)
        if run:
            out.append(postprocess_text(self.sp_model.DecodePieces(run)))
        return "".join(out)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(i) for i in token_ids]
        pad_id = self.pad_token_id
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        n_pieces = self.sp_model.GetPieceSize()
        out, run = [], []
        for index in token_ids:
            if 0 <= index < n_pieces:
                if index != pad_id and index not in skipped:
                    run.append(index)
                continue
            if index not in self._added_tokens_decoder:
                self._convert_id_to_token(index)  # raises with the vocabulary sizes
            # Text after an added token was encoded separately (own "▁" prefix), so decode it separately too,
            # whether or not the token itself is shown.
            if run:
                out.append(postprocess_text(self.sp_model.DecodeIds(run)))
                run = []
            if index not in skipped:
                out.append(self._added_tokens_decoder[index].content)
        if run:
            out.append(postprocess_text(self.sp_model.DecodeIds(run)))
        text = "".join(out)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ---- saving -----------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy ``ice_text.model`` into ``save_directory`` (as the original, the file is copied byte for byte)."""
        if os.path.isdir(save_directory):
            name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
            out_file = os.path.join(save_directory, name)
        else:
            out_file = save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out_file)
            else:
                with open(out_file, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out_file,)


def _special(token) -> AddedToken:
    """An added special token that is matched verbatim and leaves the surrounding spaces alone."""
    return AddedToken(str(token), lstrip=False, rstrip=False, normalized=False, special=True, single_word=False)
