"""The images behind a store, for people to look at (the concept browser)."""

import io

from PIL import Image

from archsae.errors import InvalidSetting, UserError
from archsae.extract.sources import open_source


class StoreImages:
    """The images a store was extracted from, as the backbone saw them (timm's eval resize and
    centre crop), found where the store says they were (or at `data`) and checked against the
    store's manifest hash."""

    def __init__(self, store, data: str | None):
        import timm.data

        source_info = store.attrs.get("source") or {}
        location = data or source_info.get("location")
        if source_info.get("kind") == "import" or not location:
            raise UserError(f"{store.path} has no images (imported activations): the browser "
                            "needs a store made by `archsae extract`")
        try:
            self.source = open_source(location).limit(store.n_images)  # an extraction's --limit
        except UserError as exc:
            raise InvalidSetting("data", f"the images of {store.path} are not at {location} ({exc}): "
                                         "pass {name} with where they are now") from None
        if self.source.manifest_hash() != store.attrs.get("source_hash"):
            raise InvalidSetting("data", f"the images at {location} are not the ones {store.path} was "
                                         "extracted from: pass {name} with the original images")
        cfg = store.attrs["preprocessing"]
        transform = timm.data.create_transform(
            input_size=tuple(cfg["input_size"]), interpolation=cfg.get("interpolation", "bicubic"),
            crop_pct=cfg.get("crop_pct", 0.875), crop_mode=cfg.get("crop_mode", "center"))
        self.steps = [t for t in transform.transforms
                      if "Tensor" not in type(t).__name__ and "Normalize" not in type(t).__name__]

    def thumbnail(self, i: int) -> bytes:
        with Image.open(io.BytesIO(self.source.read(i))) as img:
            img = img.convert("RGB")
            for step in self.steps:
                img = step(img)
        buf = io.BytesIO()
        img.resize((224, 224), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=85)
        return buf.getvalue()
