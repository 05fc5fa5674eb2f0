"""`n2eye.load(path)`: the one object that answers, for the CLI, the server, eval and users.

- `chat(messages)`: one answer to a conversation (optionally streamed).
- `generate_batch(conversations)`: many conversations at once (left padding, one `generate`).
- `session()`: a multi-turn chat that keeps the LFM2 hybrid cache (attention KV + conv state) between turns, so
  a follow-up turn only runs its new tokens and never re-encodes earlier images.
Vision grids are cached by crop content (bounded LRU, `vision_cache.py`), so the same picture is encoded once.
Every call takes `image_settings` (`min_image_tokens`, `max_image_tokens`, `do_image_splitting`: LFM2-VL's image
policy; a fixed-resolution checkpoint takes `do_image_splitting` only, its Idefics2-style 4 crops + the whole image),
over the engine's own (`load(..., image_settings=...)`, the CLI's flags) over the checkpoint's.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, TextStreamer

from ..image_settings import checked_image_settings
from ..vision_inputs import VisionInputs
from .vision_cache import VisionGridCache

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|pad|>")


class StopOnEvent(StoppingCriteria):
    """Ends `generate` once `event` is set (a client went away, a stream was closed)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """`text` up to the first of the `stops` strings (which OpenAI's API leaves out), and whether one was found."""
    positions = [i for i in (text.find(s) for s in stops or []) if i >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


class N2Eye:
    """A loaded N2-Eye model + processor with chat, batch generation and cached multi-turn sessions."""

    def __init__(self, model, processor, image_cache_size: int = 64, image_settings: Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vision_cache = VisionGridCache(model, image_cache_size)
        self.image_settings = checked_image_settings(processor, image_settings)
        self._end_ids = {i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS) if i is not None}
        self._lock = threading.Lock()
        from ..modeling.processing_n2eye import never_generated_token_ids

        # checkpoints saved before `suppress_tokens` was in their generation_config get it here
        self._suppress = None if model.generation_config.suppress_tokens else never_generated_token_ids(self.tokenizer)

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        bf16_kernel: bool = False,
        trust_remote_code: bool = False,
        image_settings: Mapping[str, Any] | None = None,
    ) -> N2Eye:
        """Loads a checkpoint folder or hub id as transformers users do. A checkpoint's own code (its copies of
        our modeling files) runs only when `trust_remote_code=True`; when its files equal the installed n2eye's,
        the installed package's classes are used and no flag is needed (`checkpoint_code`).
        `quantize="int8"` or `"int4"` swaps the LM's linear layers for weight-only kernels (CPU; opt-in because
        it changes the numbers: see benchmarks/README.md). `bf16_kernel=True` (bf16 on a CPU with AVX-512 BF16)
        runs decode rows through our bf16 kernel: faster, and numbers that differ in the last bit. LFM2's short
        conv always takes the exact fused one-token path on CPU. `image_settings`: LFM2-VL image policy options
        for every call (checked now: a ValueError names a bad one)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        code = checkpoint_code(path, trust_remote_code)
        if code == "package":  # the checkpoint's code is ours: run the installed copy
            from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
            from ..modeling.processing_n2eye import N2EyeProcessor

            model = N2EyeForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
            # its tokenizer and image processor are transformers' classes; the flag only silences the question
            # their configs' auto_map would ask (any code file there is one of ours, compared above)
            processor = N2EyeProcessor.from_pretrained(str(path), trust_remote_code=True)
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(path), trust_remote_code=code == "remote",
                                                                dtype=dtype)  # fmt: skip
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=code == "remote")
        if device:
            model.to(device)
        if quantize:
            from .quantize import quantize_language_model

            quantize_language_model(model, quantize)
        if device in (None, "cpu"):  # CPU decode fast paths: infer/fast_decode.py
            from .fast_decode import use_fast_decode

            use_fast_decode(model, bf16_kernel=bf16_kernel)
        return cls(model, processor, image_settings=image_settings)

    # ---- helpers -----------------------------------------------------------------------------------------------
    def generation_options(self, **overrides: Any) -> dict[str, Any]:
        """The checkpoint's generation_config (LFM2-VL defaults) with the caller's overrides; greedy when
        temperature is 0. `stop` (a string or list of strings, as in OpenAI's API) ends the answer before it.
        Structure tokens (`<image>`, `<|im_start|>`, ...) are never sampled."""
        options = {k: v for k, v in overrides.items() if v is not None}
        if options.get("temperature") == 0:
            options.pop("temperature")
            options["do_sample"] = False
        options.setdefault("max_new_tokens", 256)
        if self._suppress:
            options.setdefault("suppress_tokens", self._suppress)
        stop = options.pop("stop", None)
        if stop:
            options["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            options["tokenizer"] = self.tokenizer
        return options

    def decode(self, ids) -> str:
        """Text of generated ids: special tokens kept (tool-call markers), end/pad tokens dropped."""
        ids = [int(i) for i in ids if int(i) not in self._end_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def images_kwargs(self, image_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The processor's image options for one call: the engine's, then the call's (checked: ValueError)."""
        return {**self.image_settings, **checked_image_settings(self.processor, image_settings)}

    def _model_inputs(self, encoded) -> dict[str, Any]:
        """Moves processor output to the model and swaps the image crops for cached vision grids (keyed on the
        CPU: only new crops travel to the model's device)."""
        encoded = dict(encoded)
        crops = VisionInputs.pop_from(encoded)
        inputs = {k: v.to(self.model.device) for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        if crops is not None:
            inputs["vision_features"] = self.vision_cache.grids(crops)
        inputs.pop("assistant_masks", None)
        return inputs

    def _encode(self, conversations, tools=None, image_settings: Mapping[str, Any] | None = None):
        return self.processor.apply_chat_template(
            conversations,
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, **self.images_kwargs(image_settings)},
        )

    # ---- one-shot ------------------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict],
        images: list | None = None,
        tools: list[dict] | None = None,
        stream: bool = False,
        cancel: threading.Event | None = None,
        image_settings: Mapping[str, Any] | None = None,
        **options: Any,
    ):
        """Answers a conversation (HF chat messages, images as content items, or `{"type": "image"}` placeholders
        filled in order from `images`). Returns the text, or an iterator of text chunks with `stream=True`
        (closing the iterator, or setting `cancel`, stops the generation)."""
        if images:
            from ..data.collate import fill_images

            messages = fill_images(messages, list(images))
        inputs = self._model_inputs(self._encode(messages, tools, image_settings))
        options = self.generation_options(**options)
        if stream:
            return self._stream(inputs, options, cancel or threading.Event())
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, **options)
        return cut_at_stop(self.decode(out[0, inputs["input_ids"].shape[1] :]), options.get("stop_strings"))[0]

    def chat_message(
        self, messages: list[dict], images: list | None = None, tools: list[dict] | None = None, **options: Any
    ) -> dict[str, Any]:
        """An OpenAI-style assistant message: content plus parsed `tool_calls`."""
        text = self.chat(messages, images=images, tools=tools, **options)
        content, calls = self.processor.parse_tool_calls(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return message

    def generate_batch(
        self, conversations: list[list[dict]], tools: list[dict] | None = None, **options: Any
    ) -> list[str]:
        """Answers several conversations in one left-padded `generate` call."""
        return [c["text"] for c in self.complete_batch(conversations, tools, **options)]

    def complete_batch(
        self,
        conversations: list[list[dict]],
        tools: list[dict] | None = None,
        image_settings: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """Like `generate_batch`, with token counts and why each answer stopped ("stop" or "length")."""
        if not conversations:
            return []
        self.tokenizer.padding_side = "left"
        inputs = self._model_inputs(self._encode(conversations, tools, image_settings))
        options = self.generation_options(**options)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, **options)
        prompt = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt in zip(out, prompt_tokens):
            generated = [int(t) for t in row[prompt:]]
            pad = self.tokenizer.pad_token_id
            while generated and generated[-1] == pad:  # rows that ended early are padded
                generated.pop()
            ended = bool(generated) and generated[-1] in self._end_ids
            text, stopped = cut_at_stop(self.decode(generated), options.get("stop_strings"))
            results.append(
                {
                    "text": text,
                    "prompt_tokens": int(n_prompt),
                    "completion_tokens": len(generated),
                    "finish_reason": "length" if not (stopped or ended) and len(generated) >= options["max_new_tokens"]
                    else "stop",
                }
            )
        return results

    def count_prompt_tokens(
        self, messages: list[dict], tools: list[dict] | None = None, image_settings: Mapping[str, Any] | None = None
    ) -> int:
        """Tokens the conversation takes as a prompt, image tokens included."""
        return int(self._encode(messages, tools, image_settings)["input_ids"].shape[1])

    def _stream(self, inputs: dict, options: dict, cancel: threading.Event) -> Iterator[str]:
        """Text chunks as `generate` (in a worker thread) produces them. A failure in the worker is raised here
        (never a hang); closing this iterator or setting `cancel` ends the generation and the worker."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=0.5)
        failure: list[BaseException] = []
        criteria = [StopOnEvent(cancel), *(options.pop("stopping_criteria", None) or [])]

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**inputs, **options, streamer=streamer, stopping_criteria=criteria)
            except BaseException as err:  # reaches the consumer below, which raises it
                failure.append(err)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="n2eye-stream")
        thread.start()
        stops = options.get("stop_strings") or []
        hold = max((len(s) for s in stops), default=1) - 1  # text that may be the start of a stop string
        text, shown = "", 0
        try:
            while True:
                try:
                    chunk = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing yet: waiting for the lock or a slow step, unless the worker died
                    if thread.is_alive():
                        continue
                    break
                for token in END_TOKENS:
                    chunk = chunk.replace(token, "")
                text += chunk
                visible, stopped = cut_at_stop(text, stops)
                end = len(visible) if stopped else max(shown, len(visible) - hold)
                if end > shown:
                    yield visible[shown:end]
                    shown = end
                if stopped:
                    cancel.set()
                    break
            if failure:
                raise failure[0]
            if not cancel.is_set() and len(text) > shown:
                yield text[shown:]
        finally:
            cancel.set()
            thread.join(timeout=60)

    # ---- multi-turn ------------------------------------------------------------------------------------------------
    def session(
        self,
        system: str | None = None,
        tools: list[dict] | None = None,
        image_settings: Mapping[str, Any] | None = None,
    ) -> ChatSession:
        return ChatSession(self, system=system, tools=tools, image_settings=image_settings)


class CallbackStreamer(TextStreamer):
    """Feeds the generated text to a callback as it is decoded (end/pad tokens dropped)."""

    def __init__(self, tokenizer, callback):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        for token in END_TOKENS:
            text = text.replace(token, "")
        if text:
            self.callback(text)


class ChatSession:
    """A conversation whose model state (LFM2 KV + conv cache) is kept between turns.

    Each turn renders the whole conversation with the chat template, checks that the already-processed text is
    its prefix, and runs only the new tokens (with only the new images). If the prefix ever differs (e.g. the
    system prompt changed), it falls back to a full prefill.
    """

    def __init__(self, engine: N2Eye, system: str | None = None, tools: list[dict] | None = None,
                 image_settings: Mapping[str, Any] | None = None):  # fmt: skip
        self.engine = engine
        self.tools = tools
        self.images_kwargs = engine.images_kwargs(image_settings)  # one image policy for the whole conversation
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.reset_cache()

    def reset_cache(self) -> None:
        self.ids: torch.Tensor | None = None  # every token of the conversation so far (prompt + answers)
        self.cache = None
        self.prefix_text = ""  # rendered text covered by self.ids
        self.prefilled_tokens = 0  # tokens the model ran in prefill over the session (for tests and stats)

    def _render(self, add_generation_prompt: bool) -> str:
        return self.engine.processor.apply_chat_template(
            self.messages, tools=self.tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def send(self, content: str | list[dict], on_text=None, **options: Any) -> str:
        """Adds a user turn (text or content items with images), generates, keeps the answer in the history.
        `on_text(chunk)` is called with the answer's text as it is generated (streaming)."""
        engine = self.engine
        self.messages.append({"role": "user", "content": content})
        full = self._render(add_generation_prompt=True)
        items = content if isinstance(content, list) else []
        from ..images import is_image_item

        new_images = [i for i in items if is_image_item(i)]
        if self.ids is None or not full.startswith(self.prefix_text):
            self.reset_cache()
            encoded = engine.processor.apply_chat_template(
                self.messages, tools=self.tools, add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", processor_kwargs=dict(self.images_kwargs),  # a copy: transformers adds to it
            )  # fmt: skip
            history = torch.empty((1, 0), dtype=torch.long)
        else:
            suffix = full[len(self.prefix_text) :]
            images = [self._image_source(item) for item in new_images]
            encoded = engine.processor(text=suffix, images=images or None, return_tensors="pt", **self.images_kwargs)
            history = self.ids
        inputs = engine._model_inputs(encoded)
        new_ids = inputs.pop("input_ids")
        input_ids = torch.cat([history.to(new_ids.device), new_ids], dim=1)
        from transformers import DynamicCache

        cache = self.cache if self.cache is not None else DynamicCache(config=engine.model.config)
        seen = cache.get_seq_length()
        self.prefilled_tokens += input_ids.shape[1] - seen
        streamer = CallbackStreamer(engine.tokenizer, on_text) if on_text else None
        with engine._lock, torch.inference_mode():
            out = engine.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                past_key_values=cache,
                vision_features=inputs.get("vision_features"),
                streamer=streamer,
                **engine.generation_options(**options),
            )
        answer_ids = out[0, input_ids.shape[1] :]
        text = engine.decode(answer_ids)
        self.messages.append({"role": "assistant", "content": text})
        end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.ids, self.cache = out, cache
        covered = self._render(add_generation_prompt=False)  # ends with "<|im_end|>\n"
        if len(answer_ids) and int(answer_ids[-1]) == end:
            self.prefix_text = covered[: -len("\n")]
        else:  # stopped by max_new_tokens: the next suffix starts by closing this answer
            self.prefix_text = covered[: -len("<|im_end|>\n")]
        return text

    @staticmethod
    def _image_source(item: dict) -> Any:
        from ..images import image_item_source

        source = image_item_source(item)
        if source is None:
            raise ValueError("An image item needs one of: image, url, path, base64 (or an OpenAI image_url).")
        return source


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    bf16_kernel: bool = False,
    trust_remote_code: bool = False,
    image_settings: Mapping[str, Any] | None = None,
) -> N2Eye:
    """`n2eye.load(path)`: the model and processor behind one object (`quantize="int8"|"int4"` and
    `bf16_kernel=True`: opt-in, they change the numbers; `trust_remote_code=True`: run a checkpoint's own code
    when it differs from the installed n2eye's; `image_settings`: LFM2-VL image policy options for every call,
    e.g. {"max_image_tokens": 64})."""
    return N2Eye.load(path, dtype=dtype, device=device, quantize=quantize, bf16_kernel=bf16_kernel,
                      trust_remote_code=trust_remote_code, image_settings=image_settings)  # fmt: skip


class UntrustedCodeError(ValueError):
    """A checkpoint carries code that differs from the installed n2eye's and was not trusted explicitly."""


def checkpoint_code(path: str | Path, trust_remote_code: bool = False) -> str:
    """Decides whose code loads `path`:

    - "native": no code in the checkpoint (transformers' own classes, e.g. an exported Lfm2Vl);
    - "package": its code files equal the installed n2eye's, whose classes are used;
    - "remote": the checkpoint's own code, only when trusted explicitly (with a warning); otherwise
      `UntrustedCodeError` names the files that differ."""
    import filecmp
    import warnings

    from transformers.utils import cached_file

    from ..checkpoint import MODELING_FILES, modeling_source_dir

    config_file = cached_file(str(path), "config.json")
    auto_map = json.loads(Path(config_file).read_text()).get("auto_map") if config_file else None
    if not auto_map:
        return "native"
    folder = Path(config_file).parent
    ours = modeling_source_dir()
    code = sorted({*(p.name for p in folder.glob("*.py")), *MODELING_FILES})
    differing = []
    for name in code:
        theirs = folder / name
        if not theirs.exists():
            theirs = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)
        if theirs is None or not (ours / name).exists() or not filecmp.cmp(theirs, ours / name, shallow=False):
            differing.append(name)
    if not differing:
        return "package"
    if trust_remote_code:
        warnings.warn(f"Running the code shipped in {path} ({', '.join(differing)} differ from the installed n2eye's): "
                      "trusted explicitly.", stacklevel=3)  # fmt: skip
        return "remote"
    raise UntrustedCodeError(
        f"{path} carries code that differs from the installed n2eye's ({', '.join(differing)}); it is not run "
        "unless you trust it: pass trust_remote_code=True (CLI: --trust-remote-code). A checkpoint saved by an "
        "older n2eye can instead take the installed code: python -c \"from n2eye.checkpoint import "
        f"copy_modeling_files; copy_modeling_files('{path}')\"."
    )
