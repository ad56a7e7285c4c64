"""The fine-tuning data formats users already have, each read by one small adapter into :class:`Sample`.

| ``--data-format``   | layout | from |
|---|---|---|
| ``visualglm-fewshot`` | a JSON list of ``{"img": path, "prompt": str, "label": str}`` | VisualGLM-6B ``fewshot-data/dataset.json`` (``finetune_visualglm.py`` ``FewShotDataset``) |
| ``cogvlm-sft``      | ``images/NAME.jpg`` + ``labels/NAME.json`` (``{"conversations": [{"role", "content"}, ...]}`` or ``{"captions": [...]}``) | CogVLM-SFT-311K (CogVLM ``dataset.md``, CogVLM2 ``finetune_demo``) |
| ``cc-sbu-align``    | ``image/ID.jpg`` + ``filter_cap.json`` (``{"annotations": [{"image_id", "caption"}]}``) | MiniGPT-4 stage 2 (``cc_sbu_dataset.py``, ``prompts/alignment.txt``) |
| ``jsonl``           | one ``{"messages": [...], "images": [...]}`` per line (transformers chat format) | the ecosystem (TRL, LLaMA-Factory, ms-swift) |

A conversation with several assistant turns becomes one sample per assistant turn, each with the turns before it
as history: every answer is supervised once, under the rule of the family's original (which supervises one
answer per sample and gives earlier turns as context; CogVLM2's ``peft_lora.py`` samples one round at random,
here every round is used, deterministically). At most one image per conversation (all three families).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# MiniGPT-4 stage 2: prompts/alignment.txt (4 lines, "<Img><ImageHere></Img> " + the instruction), spec minigpt4.md
# §1.7. The original draws one at random per batch; here sample i gets prompt i % 4 (deterministic, balanced).
ALIGNMENT_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
# CogVLM-SFT-311K caption files carry no question; the first alignment instruction asks for the caption
CAPTION_QUERY = ALIGNMENT_INSTRUCTIONS[0]


class DataError(ValueError):
    """A data file or folder that cannot be read as the given format; the message names the file and entry."""


@dataclass(frozen=True)
class Sample:
    """One supervised answer: ``answer`` to ``query`` after ``history`` turns, about ``image`` (a file or None).

    ``template`` names a training prompt other than the family's chat prompt: ``"minigpt4-stage2"`` is MiniGPT-4's
    stage-2 ``prompt_template`` (cc_sbu_align data; other families use their chat prompt for it)."""

    query: str
    answer: str
    image: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    source: str = ""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable as JSON ({e})") from None


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _image_file(path: Path, where: str) -> str:
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    return str(path)


def _find_image(folder: Path, stem: str, where: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return str(candidate)
    raise DataError(f"{where}: no image named {stem}.* ({', '.join(IMAGE_SUFFIXES)}) in {folder}")


def _turns_to_samples(turns: list[tuple[str, str]], image, template, source: str) -> list[Sample]:
    samples = []
    for i, (query, answer) in enumerate(turns):
        samples.append(Sample(query=query, answer=answer, image=image, history=tuple(turns[:i]), template=template,
                              source=f"{source} turn {i + 1}" if len(turns) > 1 else source))
    return samples


def _pair_roles(messages: list, where: str, text_of) -> list[tuple[str, str]]:
    """[user, assistant, user, assistant, ...] → [(query, answer), ...] (a trailing user message is refused)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    turns = []
    for i in range(0, len(messages), 2):
        pair = messages[i:i + 2]
        roles = [m.get("role") if isinstance(m, dict) else None for m in pair]
        if roles != ["user", "assistant"]:
            raise DataError(f"{where}: messages must alternate user/assistant starting with user and end with an "
                            f"assistant answer (the families have no system role); messages {i}-{i + len(pair) - 1} "
                            f"have roles {roles}")
        turns.append((text_of(pair[0], f"{where} message {i}"), text_of(pair[1], f"{where} message {i + 1}")))
    return turns


# --- the four adapters ------------------------------------------------------------------------------------------

def load_visualglm_fewshot(path: str | Path) -> list[Sample]:
    """VisualGLM's fewshot JSON. ``img`` is read as the original does (relative to the working directory), or
    else relative to the JSON file's folder."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"img\", \"prompt\", \"label\"}} objects")
    samples = []
    for i, item in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(item, dict) or not {"img", "prompt", "label"} <= set(item):
            raise DataError(f"{where}: expected keys img, prompt, label; got {item!r:.200}")
        img = Path(_text(item["img"], f"{where} img"))
        image = img if img.is_absolute() or img.is_file() else path.parent / img
        samples.append(Sample(query=_text(item["prompt"], f"{where} prompt"),
                              answer=_text(item["label"], f"{where} label"),
                              image=_image_file(image, where), source=where))
    return samples


def load_cogvlm_sft(folder: str | Path, labels_dir: str | None = None) -> list[Sample]:
    """A CogVLM-SFT-311K subset folder: ``images/`` + ``labels/`` (``labels_en`` / ``labels_zh`` in the Hub copy:
    pass ``labels_dir``). Caption files become one sample asking :data:`CAPTION_QUERY`."""
    folder = Path(folder)
    images = folder / "images"
    if labels_dir is None:
        found = [name for name in ("labels", "labels_en", "labels_zh") if (folder / name).is_dir()]
        if len(found) != 1:
            raise DataError(f"{folder}: expected images/ and one labels folder (labels, labels_en or labels_zh); "
                            f"found {found or 'none'}" + ("; pick one with --labels-dir" if found else ""))
        labels_dir = found[0]
    labels = folder / labels_dir
    if not images.is_dir() or not labels.is_dir():
        raise DataError(f"{folder}: expected the folders images/ and {labels_dir}/")
    samples = []
    for label_file in sorted(labels.glob("*.json")):
        where = str(label_file)
        data = _read_json(label_file)
        image = _find_image(images, label_file.stem, where)
        if isinstance(data, dict) and "conversations" in data:
            def text_of(message, w):
                return _text(message.get("content"), w)

            turns = _pair_roles(data["conversations"], where, text_of)
        elif isinstance(data, dict) and "captions" in data:
            captions = data["captions"]
            if not isinstance(captions, list) or not captions or not isinstance(captions[0], dict):
                raise DataError(f"{where}: captions must be a non-empty list of {{\"role\", \"content\"}}")
            turns = [(CAPTION_QUERY, _text(captions[0].get("content"), f"{where} caption"))]
        else:
            raise DataError(f"{where}: expected a \"conversations\" or \"captions\" list")
        samples += _turns_to_samples(turns, image, None, where)
    if not samples:
        raise DataError(f"{labels}: no *.json label files")
    return samples


def load_cc_sbu_align(folder: str | Path) -> list[Sample]:
    """MiniGPT-4's cc_sbu_align: ``filter_cap.json`` annotations, image ``image/{image_id}.jpg``; instruction i % 4
    of :data:`ALIGNMENT_INSTRUCTIONS`, wrapped in MiniGPT-4's stage-2 ``prompt_template``."""
    folder = Path(folder)
    data = _read_json(folder / "filter_cap.json")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise DataError(f"{folder / 'filter_cap.json'}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}, ...]}}")
    samples = []
    for i, ann in enumerate(annotations):
        where = f"{folder / 'filter_cap.json'} annotation {i}"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{where}: expected keys image_id and caption")
        image = _find_image(folder / "image", str(ann["image_id"]), where)
        samples.append(Sample(query=ALIGNMENT_INSTRUCTIONS[i % len(ALIGNMENT_INSTRUCTIONS)],
                              answer=_text(ann["caption"], f"{where} caption"), image=image,
                              template="minigpt4-stage2", source=where))
    return samples


def load_jsonl(path: str | Path) -> list[Sample]:
    """One conversation per line: ``messages`` (``content`` a string or a list of ``{"type": "text", "text"}`` /
    ``{"type": "image"}`` blocks) and ``images`` (paths relative to the file's folder; at most one)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{where}: expected {{\"messages\": [...], \"images\": [...]}}")
        images = record.get("images") or []
        if not isinstance(images, list) or len(images) > 1:
            raise DataError(f"{where}: \"images\" must be a list of at most one path (one image per conversation)")
        blocks = 0

        def text_of(message, w):
            nonlocal blocks
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for block in content:
                    kind = block.get("type") if isinstance(block, dict) else None
                    if kind == "image":
                        blocks += 1
                    elif kind == "text":
                        texts.append(str(block.get("text", "")))
                    else:
                        raise DataError(f"{w}: content blocks must be of type text or image, got {block!r:.100}")
                content = "".join(texts)
            return _text(content, w)

        turns = _pair_roles(record["messages"], where, text_of)
        if blocks > 1 or (blocks and not images):
            raise DataError(f"{where}: {blocks} image block(s) but {len(images)} image(s) in \"images\"")
        image = None
        if images:
            img = Path(_text(images[0], f"{where} images[0]"))
            image = _image_file(img if img.is_absolute() else path.parent / img, where)
        samples += _turns_to_samples(turns, image, None, where)
    if not samples:
        raise DataError(f"{path}: no conversations")
    return samples


FORMATS = {
    "visualglm-fewshot": load_visualglm_fewshot,
    "cogvlm-sft": load_cogvlm_sft,
    "cc-sbu-align": load_cc_sbu_align,
    "jsonl": load_jsonl,
}


def load_samples(data_format: str, path: str | Path, labels_dir: str | None = None) -> list[Sample]:
    if data_format not in FORMATS:
        raise DataError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
    if data_format == "cogvlm-sft":
        return load_cogvlm_sft(path, labels_dir)
    return FORMATS[data_format](path)
