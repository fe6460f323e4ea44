"""The PNG figures of the `plot` stage (matplotlib, no screen needed)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from captioning.files import atomic_path  # noqa: E402
from captioning.images import ImageTooLarge, open_upright_rgb  # noqa: E402

# Longest side an image is drawn from: a grid cell is 4 in (400 px at the figures' 100 dpi) wide.
DISPLAY_SIDE = 800


def _wrap(text: str, width: int = 42) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _picture(path: Path) -> Image.Image:
    """The image upright and in RGB as extraction makes it (the same decoding, bomb guard and refusals: a 16-bit
    photo not drawn white, transparency on white), shrunk to DISPLAY_SIDE; refused (ImageTooLarge) above the
    pixel limit extraction refuses too, rather than decoding hundreds of megapixels only to draw them 400 px wide."""
    image = open_upright_rgb(path, DISPLAY_SIDE)
    image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return image


def _show(ax, path: Path, text: str) -> None:
    try:
        ax.imshow(_picture(path))
    except ImageTooLarge:
        ax.text(0.5, 0.5, "image too large to show", ha="center", va="center")
    except Exception:  # noqa: BLE001 - an unusable photo (ImageError) or anything else: one bad photo among
        # the samples must not fail the plot stage at the end of a whole run, nor lose the other figures
        ax.text(0.5, 0.5, "image unreadable", ha="center", va="center")
    ax.set_axis_off()
    ax.set_title(text, fontsize=7, loc="left", parse_math=False)  # a caption's "$5" is no TeX


def _save(fig, path: Path) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def image_grid(items: list[tuple[Path, str]], path: Path, columns: int = 3, title: str = "") -> None:
    """Images with a caption block under each (used for samples, predictions, best/worst)."""
    rows = max(1, -(-len(items) // columns))
    texts = [_wrap(text) for _, text in items]
    # Room above each image for the longest caption block; constrained layout (not tight_layout)
    # then keeps multi-line blocks from running into the row above.
    lines = max((text.count("\n") + 1 for text in texts), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, (3.6 + 0.14 * lines) * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (image, _), text in zip(axes.flat, items, texts, strict=False):  # a grid may have spare cells
        _show(ax, image, text)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def learning_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and masked token accuracy, train against val, per epoch."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history) + 1)
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "token accuracy")):
        ax.plot(epochs, history[metric], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, path)


def with_references(generated: str, references: list[str], scores: str = "") -> str:
    refs = "\n".join(f"ref: {r}" for r in references[:3])
    return f"model: {generated}{scores}\n{refs}"


def best_and_worst(predictions: pd.DataFrame, most: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `most` best and the `most` worst test images by CIDEr (ties by image name), never one image in
    both: a test split of fewer than 2 * `most` images is halved instead (the best get the odd one), so a
    small split does not show its images twice, as best and as worst."""
    ranked = predictions.sort_values(["cider", "image"], ascending=[False, True])
    best = ranked.head(min(most, -(-len(ranked) // 2)))
    return best, ranked.iloc[len(best):].tail(most)


def best_worst_grid(predictions: pd.DataFrame, images_dir: Path, path: Path, most: int = 6) -> None:
    """The best images in the top row and the worst in the bottom one, with the counts actually shown."""
    best, worst = best_and_worst(predictions, most)
    shown = [(images_dir / row.image,
              with_references(row.generated, list(row.references), f"  (CIDEr {row.cider:.2f})"))
             for row in pd.concat([best, worst]).itertuples()]
    # One row each: as many columns as best images (never fewer than worst ones, see best_and_worst).
    image_grid(shown, path, columns=max(len(best), 1),
               title=f"{len(best)} best (top) and {len(worst)} worst (bottom) test images by CIDEr")


def read_live_history(live_dir: Path) -> pd.DataFrame:
    """Per-epoch loss/accuracy for train and val from DVCLive's .tsv files."""
    columns = {}
    for split, prefix in (("train", ""), ("val", "val_")):
        for metric in ("loss", "accuracy"):
            table = pd.read_csv(Path(live_dir) / "plots" / "metrics" / split / f"{metric}.tsv", sep="\t")
            columns[f"{prefix}{metric}"] = table[metric].to_numpy()
    return pd.DataFrame(columns)


def captioned_image(image: Path, caption: str, path: Path) -> None:
    """One image with its caption written under it (the caption command's --out)."""
    fig, ax = plt.subplots(figsize=(5, 5.6))
    _show(ax, image, "")
    ax.set_title("")
    fig.text(0.5, 0.02, "\n".join(textwrap.wrap(caption, 48)), ha="center", va="bottom", fontsize=12,
             parse_math=False)
    fig.subplots_adjust(bottom=0.12)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
