"""The training dataset (encoded samples; images through the folder's own image processor, as at inference) and
the collator (left padding like the families' processors; pads are never attended nor supervised)."""

from __future__ import annotations

import torch
from PIL import Image

from .encode import IGNORE, Encoded


class FinetuneDataset(torch.utils.data.Dataset):
    """Encoded samples; each image is opened and preprocessed when its sample is drawn (memory stays flat)."""

    def __init__(self, encoded: list[Encoded], image_processor):
        self.encoded = list(encoded)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict:
        item = self.encoded[index]
        row = {"input_ids": torch.tensor(item.input_ids, dtype=torch.long),
               "labels": torch.tensor(item.labels, dtype=torch.long), "pixel_values": None}
        if item.image is not None:
            with Image.open(item.image) as image:
                row["pixel_values"] = self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return row


class Collator:
    """Rows → a left-padded batch: ``input_ids`` (pad id), ``attention_mask`` (0 on pads), ``labels`` (−100 on pads)
    and ``pixel_values`` (N_images, 3, S, S) for the rows that have an image, in row order (CONTRACTS §4)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n:] = r["input_ids"]
            labels[i, width - n:] = r["labels"]
            mask[i, width - n:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [r["pixel_values"] for r in rows if r.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images, dim=0)
        return batch
