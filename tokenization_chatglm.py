"""The ChatGLM-6B tokenizer: SentencePiece (`ice_text.model`) with the official id layout.

- ids 0 .. num_image_tokens-1 are image tokens (`<image_N>`); a SentencePiece id p becomes p + num_image_tokens;
- a newline is the piece `<n>`, a tab `<|tab|>`, a run of 2..80 spaces `<|blank_N|>`; decoding reverses it;
- a prompt ends in `[gMASK] <sop>`; a training pair is `prompt [gMASK] <sop> answer <eop>`.

`train_sentencepiece_model` trains a small model with the same special pieces, for tests and tiny models.
"""
import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

MAX_BLANK = 80
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
LAYOUT_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
BLANK_RUN = re.compile(" {2,%d}" % MAX_BLANK)
BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")


def encode_layout(text: str) -> str:
    """Newlines, tabs and runs of spaces -> the pieces the vocabulary has for them."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return BLANK_RUN.sub(lambda m: f"<|blank_{len(m.group())}|>", text)


def decode_layout(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return BLANK_PIECE.sub(lambda m: " " * int(m.group(1)), text)


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tokenizer model not found")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
    return processor


def train_sentencepiece_model(texts, output_path, vocab_size=3000, chatglm6b_pieces=True):
    """Train a SentencePiece model on `texts`; writes `output_path`. With `chatglm6b_pieces`, ChatGLM-6B's special
    and layout pieces are in the vocabulary and the text is laid out as its tokenizer does (ChatGLM2/3 append their
    special tokens after the SentencePiece vocabulary instead).

    Identity normalisation and byte fallback keep text -> ids -> text lossless for any input.
    """
    import io
    sentences = [encode_layout(t) if chatglm6b_pieces else t for t in texts if t.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        user_defined_symbols=LAYOUT_PIECES + SPECIAL_PIECES if chatglm6b_pieces else [],
        normalization_rule_name="identity",
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", max_sentence_length=1 << 16,
        hard_vocab_limit=False, num_threads=2, minloglevel=2,
    )
    with open(output_path, "wb") as f:
        f.write(model.getvalue())
    return output_path


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, num_image_tokens=20000, bos_token="<sop>", eos_token="<eop>", end_token="</s>",
                 mask_token="[MASK]", gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>",
                 padding_side="left", **kwargs):
        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.sp = load_sentencepiece(vocab_file)
        self.gmask_token = gmask_token
        self.end_token = end_token
        kwargs.pop("extra_special_tokens", None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, padding_side=padding_side, num_image_tokens=num_image_tokens,
                         gmask_token=gmask_token, end_token=end_token,
                         extra_special_tokens=[gmask_token, "[sMASK]"], **kwargs)

    @property
    def vocab_size(self):
        return self.num_image_tokens + self.sp.GetPieceSize()

    @property
    def gmask_token_id(self):
        return self._convert_token_to_id(self.gmask_token)

    def get_vocab(self):
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.EncodeAsPieces(encode_layout(text))

    def _convert_token_to_id(self, token):
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.PieceToId(token) + self.num_image_tokens

    def _convert_id_to_token(self, index):
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.IdToPiece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens):
        pieces = [t for t in tokens if not t.startswith("<image_")]
        return decode_layout(self.sp.DecodePieces(pieces))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [i for i in token_ids if i != self.pad_token_id]  # as the official tokenizer: pads never decode
        if skip_special_tokens:
            special = set(self.all_special_ids)
            token_ids = [i for i in token_ids if i not in special]
        # ids past the vocabulary (a padded output layer's extra rows) stand for no text
        pieces = [self._convert_id_to_token(i) for i in token_ids if self.num_image_tokens <= i < self.vocab_size]
        return decode_layout(self.sp.DecodePieces(pieces))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
