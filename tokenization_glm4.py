"""The GLM-4-9B tokenizer: byte-level BPE read from THUDM's `tokenizer.model`, run by tiktoken.

The file holds one `base64(token bytes) rank` line per BPE token; text is split by the GPT-4-style pattern below
and each piece merged by rank (tiktoken does both). The special tokens follow the BPE ranks, in the official order
(`<|endoftext|>` first: 151329 in the real vocabulary). As in THUDM's tokenizer, they are registered with
transformers as special added tokens, so a special token's text inside a message encodes to the token. A prompt
starts with `[gMASK]<sop>`; the chat template (`apply_chat_template`) writes each message as `<|role|>\\n` content.
"""
import base64
import os
import shutil

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

# The split pattern of GLM-4's tokenizer (the one of OpenAI's cl100k): contractions, letter runs with one leading
# non-letter, numbers of up to 3 digits, punctuation runs, newlines, spaces
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>"]
ROLES = ["system", "user", "assistant", "observation"]
# GLM-4-9B-Chat's template for plain messages (its tool-calling branch is not reproduced: we send no tools)
CHAT_TEMPLATE = ("[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def read_bpe_ranks(path):
    """{token bytes: rank} from a tiktoken-style file; a malformed line fails with the file and line named."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a `base64-token rank` line of a GLM-4 tokenizer.model")
    return ranks


def write_bpe_ranks(ranks, path):
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        import tiktoken
        self.vocab_file = vocab_file
        self.ranks = read_bpe_ranks(vocab_file)
        self.bpe = tiktoken.Encoding(name="glm4", pat_str=SPLIT_PATTERN, mergeable_ranks=self.ranks,
                                     special_tokens={})
        self.bytes_of = {rank: token for token, rank in self.ranks.items()}
        self.special_ids = {name: len(self.ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        for key in ("eos_token", "pad_token", "unk_token", "added_tokens_decoder", "extra_special_tokens",
                    "additional_special_tokens"):
            kwargs.pop(key, None)
        # the folder's own template (THUDM's also handles tools) when it has one
        chat_template = kwargs.pop("chat_template", None) or CHAT_TEMPLATE
        super().__init__(eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side=padding_side,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, chat_template=chat_template,
                         **kwargs)
        # special tokens as transformers' added tokens at their fixed ids: their text inside a message splits out
        # as the token, as with THUDM's tokenizer
        self.add_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS],
                        special_tokens=True)

    @property
    def vocab_size(self):
        return len(self.ranks) + len(SPECIAL_TOKENS)

    def get_command(self, name):
        """Id of a special token by its official name ("[gMASK]", "<sop>", "<|user|>"; "sop" as in ChatGLM3)."""
        return self.special_ids["<sop>" if name == "sop" else "<eop>" if name == "eop" else name]

    def get_vocab(self):
        vocab = {self._convert_id_to_token(i): i for i in range(len(self.ranks))}
        vocab.update(self.special_ids)
        return vocab

    def _tokenize(self, text, **kwargs):
        # tokens are the byte strings as latin-1 text (one char per byte), which round-trips any bytes
        return [self.bytes_of[i].decode("latin-1") for i in self.bpe.encode_ordinary(text)]

    def _convert_token_to_id(self, token):
        if token in self.special_ids:
            return self.special_ids[token]
        return self.ranks[token.encode("latin-1")]

    def _convert_id_to_token(self, index):
        if index in self.special_names:
            return self.special_names[index]
        return self.bytes_of[index].decode("latin-1")

    def convert_tokens_to_string(self, tokens):
        return b"".join(t.encode("latin-1") for t in tokens).decode("utf-8", errors="replace")

    def encode_text(self, text):
        """Ids of plain text, special-token names included as text (no added-token split): for layouts."""
        return self.bpe.encode_ordinary(text)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text, run = "", []
        for i in token_ids:
            if i in self.special_names:  # special tokens decode to their names (or nothing), between byte runs
                text += b"".join(run).decode("utf-8", errors="replace")
                text += "" if skip_special_tokens else self.special_names[i]
                run = []
            elif 0 <= i < len(self.ranks):  # a padded output layer's extra ids stand for no text
                run.append(self.bytes_of[i])
        return text + b"".join(run).decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.get_command("[gMASK]"), self.get_command("<sop>")] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def role_header_ids(self, role, metadata=""):
        """The start of a chat turn: the role token, then the metadata line (usually empty)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; GLM-4 knows {', '.join(ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.encode_text(f"{metadata}\n")

    def build_single_message(self, role, metadata, message):
        """A chat turn as the chat template writes it: `<|role|>` then `metadata\\n` and the message as one text."""
        return self.role_header_ids(role)[:1] + self.encode_text(f"{metadata}\n{message}")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
