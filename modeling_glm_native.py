"""transformers' own GLM classes with the suite's training entry: GlmForCausalLM (THUDM's glm-4-9b-chat-hf) and
Glm4ForCausalLM (the GLM-4-0414 models).

The model is transformers' class, unchanged; the subclass only accepts what the suite's training loop passes:
- `loss_only=True` (with `label_positions`): the output layer projects only the positions that have a label, the
  same loss as transformers' (the mean token cross-entropy, labels shifted inside), no full logits;
- `packed_rows` (data_set.PackRows): rows packed into one sequence. transformers finds the rows from position_ids
  that restart at 0 when no attention mask is given, and attends within each row only.
Saved folders name transformers' class, so that AutoModelForCausalLM loads them without this file.
"""
from transformers import Glm4ForCausalLM, GlmForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from modeling_chatglm import labelled_token_loss


class SuiteTrainingForward:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, loss_only=False,
                label_positions=None, packed_rows=None, **kwargs):
        if packed_rows is not None:
            attention_mask = None  # the rows are read from position_ids restarting at 0
        if labels is not None and loss_only:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False, **kwargs).last_hidden_state
            return CausalLMOutputWithPast(loss=labelled_token_loss(self.lm_head, hidden, labels, label_positions))
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               labels=labels, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        super().save_pretrained(*args, **kwargs)
        # save_pretrained wrote this subclass's name; the folder is transformers' model
        folder = args[0] if args else kwargs["save_directory"]
        self.config.architectures = [self.transformers_class.__name__]
        self.config.save_pretrained(folder)


class GlmForSuite(SuiteTrainingForward, GlmForCausalLM):
    transformers_class = GlmForCausalLM


class Glm4ForSuite(SuiteTrainingForward, Glm4ForCausalLM):
    transformers_class = Glm4ForCausalLM
