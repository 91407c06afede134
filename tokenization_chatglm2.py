"""The ChatGLM2-6B and ChatGLM3-6B tokenizers: SentencePiece (`tokenizer.model`) with the official id layout.

SentencePiece ids come first; then `[MASK] [gMASK] [sMASK] sop eop` and, for ChatGLM3 (`role_tokens`), the roles
`<|system|> <|user|> <|assistant|> <|observation|>`, in that order; text never encodes to them (as in the official
tokenizers), the layouts put them in by id. The pad token is `<unk>` (id 0 in the official files), the end token
`</s>`. A prompt starts with `[gMASK] sop`; a pair is `[gMASK] sop a b </s>`.
"""
import os
import shutil

from transformers import PreTrainedTokenizer

from tokenization_chatglm import load_sentencepiece

GLM2_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, role_tokens=False, padding_side="left", **kwargs):
        self.vocab_file = vocab_file
        self.sp = load_sentencepiece(vocab_file)
        self.role_tokens = role_tokens
        names = GLM2_SPECIAL + (ROLES if role_tokens else [])
        self.special_ids = {name: self.sp.GetPieceSize() + i for i, name in enumerate(names)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        for key in ("eos_token", "pad_token", "unk_token", "extra_special_tokens"):
            kwargs.pop(key, None)
        # the special tokens are not registered with transformers as added tokens: it would cut them out of plain
        # text ("eop" inside "people", a "<|user|>" typed in a message), which the official tokenizers never do
        super().__init__(eos_token="</s>", pad_token="<unk>", unk_token="<unk>", padding_side=padding_side,
                         role_tokens=role_tokens, **kwargs)

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize() + len(self.special_ids)

    def get_command(self, name):
        """Id of a special token by its official name ("[gMASK]", "sop", "<|user|>", ...)."""
        return self.special_ids[name]

    def get_vocab(self):
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.EncodeAsPieces(text)

    def _convert_token_to_id(self, token):
        return self.special_ids[token] if token in self.special_ids else self.sp.PieceToId(token)

    def _convert_id_to_token(self, index):
        return self.special_names[index] if index in self.special_names else self.sp.IdToPiece(index)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        hidden = {self.pad_token_id, self.sp.bos_id(), self.eos_token_id} | \
            (set(self.special_names) if skip_special_tokens else set())
        text, run = "", []
        for i in token_ids:
            if i in hidden or not 0 <= i < self.vocab_size:  # a padded output layer's extra ids stand for no text
                continue
            if i in self.special_names:  # special tokens decode to their names, between decoded runs
                text, run = text + self.sp.DecodeIds(run) + self.special_names[i], []
            else:
                run.append(i)
        return text + self.sp.DecodeIds(run)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.get_command("[gMASK]"), self.get_command("sop")] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def role_header_ids(self, role, metadata=""):
        """The start of a ChatGLM3 chat turn: the role token, then the metadata line (usually empty)."""
        if not self.role_tokens:
            raise ValueError("role tokens are ChatGLM3's; this is a ChatGLM2 tokenizer")
        if f"<|{role}|>" not in self.special_ids:
            raise ValueError(f"unknown role {role!r}; ChatGLM3 knows {', '.join(r[2:-2] for r in ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.sp.EncodeAsIds(f"{metadata}\n")

    def build_single_message(self, role, metadata, message):
        """ChatGLM3's chat turn: the role token, the metadata line, the message."""
        return self.role_header_ids(role, metadata) + self.sp.EncodeAsIds(message)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
