"""COCO captions JSON: an `images` list of {id, file_name} and an `annotations` list of {image_id, caption}."""
from __future__ import annotations

import json
from pathlib import Path

from captioning.captions.records import Record, pair_record
from captioning.errors import UserError
from captioning.pickle_scan import MAX_NESTING


def coco_records(body: bytes, path: Path) -> list[Record]:
    """One record per annotation; `image_id` is looked up in the `images` list."""
    document = _parse(body, path)
    if not (isinstance(document, dict) and isinstance(document.get("images"), list)
            and isinstance(document.get("annotations"), list)):
        raise UserError(f"{path}: JSON but not COCO captions: it needs an 'images' list of "
                        "{id, file_name} and an 'annotations' list of {image_id, caption}.")
    names = _file_names(document["images"], path)
    return [_coco_record(i, annotation, names) for i, annotation in enumerate(document["annotations"])]


def _parse(body: bytes, path: Path):
    """The parsed JSON, or one line naming what keeps `body` from being read."""
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 JSON (byte {err.start}). Re-save it as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}).") from err
    except ValueError as err:  # a number of more than 4,300 digits
        raise UserError(f"{path}: cannot read the JSON ({err}).") from err
    except RecursionError as err:
        raise UserError(f"{path}: the JSON nests arrays or objects too deep to read; "
                        "COCO captions need 3 levels.") from err
    if _deeper_than(document, MAX_NESTING):  # json.dumps of a part, below, would recurse as deep
        raise UserError(f"{path}: the JSON nests arrays or objects more than {MAX_NESTING} levels deep; "
                        "COCO captions need 3.")
    return document


def _file_names(images: list, path: Path) -> dict:
    """{image id: file_name} of the `images` list; one id given to two files is an error. An entry without
    both keys names no file: the annotations of its id are then skipped as not in the list, and reported."""
    names = {}
    for image in images:
        if isinstance(image, dict) and "id" in image and "file_name" in image:
            known = names.setdefault(_hashable(image["id"]), image["file_name"])
            if known != image["file_name"]:  # which photo its captions describe cannot be told
                raise UserError(f"{path}: the 'images' list gives id {image['id']!r} to both {known!r} and "
                                f"{image['file_name']!r}. Give each image its own id.")
    return names


def _deeper_than(document, limit: int) -> bool:
    """Whether any value in the parsed JSON `document` is more than `limit` levels down (walked iteratively)."""
    pending = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return False


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _coco_record(index: int, annotation, names: dict) -> Record:
    source = f"annotation {index}"
    text = json.dumps(annotation, ensure_ascii=False)
    if not isinstance(annotation, dict):
        return Record(source, text, problem="annotation is not an object")
    if "image_id" not in annotation or "caption" not in annotation:
        return Record(source, text, problem="annotation has no 'image_id' or no 'caption'")
    image_id = _hashable(annotation["image_id"])
    if image_id not in names:
        return Record(source, text, problem=f"image_id {annotation['image_id']!r} is not in the 'images' list")
    return pair_record(source, text, names[image_id], annotation["caption"])
