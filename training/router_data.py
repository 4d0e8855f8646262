"""Training requests for the intent router (``orchestrator/core/router.py``): text -> expert sequence.

The router must route by *intent*, not by content: "find the giraffe" is a detect call whatever the
detector knows. So the same intents are written with shapes-world content (the core's own data,
``training.core_data``'s TRAIN split) and with real-world content (the vocabularies below: COCO,
LVIS and Open Images style objects, referring expressions, scenes to draw, edit instructions). The
no-expert side (label ``()``) mentions real-world objects as often as the positive side does, so that
real-world words never mean "not an image task": captioning, visual questions, depth, pose, upscaling,
whole-image style, video, audio, 3D, and text tasks that share a verb with an expert ("generate a
poem", "outline my essay").

Everything here was written for this module; nothing comes from a public tool-use benchmark or from
``training/evalsets`` (which must never be trained on).

Labels are whole expert sequences (tuples): ``("detect",)``, ``("segment", "edit")``, ``()`` …
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

Label = tuple[str, ...]

# -- vocabularies -----------------------------------------------------------------------------------
OBJECTS = [
    # people and animals
    "person", "man", "woman", "boy", "girl", "child", "baby", "player", "goalkeeper", "referee", "cyclist",
    "dog", "puppy", "cat", "kitten", "horse", "pony", "cow", "sheep", "goat", "pig", "bird", "parrot", "duck",
    "seagull", "pigeon", "owl", "elephant", "giraffe", "zebra", "bear", "teddy bear", "lion", "tiger", "deer",
    "fox", "rabbit", "squirrel", "fish", "turtle", "butterfly", "bee", "spider", "snake", "frog", "monkey",
    # vehicles and street
    "car", "taxi", "bus", "double-decker bus", "truck", "van", "bicycle", "motorbike", "scooter", "train",
    "tram", "airplane", "helicopter", "boat", "sailboat", "ship", "rocket", "traffic light", "stop sign",
    "street sign", "parking meter", "fire hydrant", "bench", "lamp post", "license plate", "wheel", "tyre",
    "headlight", "windshield", "crosswalk", "road", "sidewalk", "bridge", "building", "house", "skyscraper",
    "church", "tower", "window", "door", "roof", "chimney", "fence", "gate", "wall", "balcony",
    # objects
    "backpack", "umbrella", "handbag", "suitcase", "tie", "hat", "cap", "helmet", "glasses", "sunglasses",
    "scarf", "jacket", "coat", "shirt", "dress", "shoe", "boot", "watch", "necklace", "ring", "glove",
    "bottle", "wine glass", "cup", "mug", "coffee cup", "saucer", "plate", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "orange", "lemon", "strawberry", "sandwich", "pizza", "donut", "cake", "croissant",
    "broccoli", "carrot", "tomato", "egg", "bread", "cheese", "chair", "armchair", "sofa", "couch", "bed",
    "pillow", "table", "desk", "shelf", "bookcase", "potted plant", "vase", "flower", "rose", "sunflower",
    "lamp", "candle", "clock", "mirror", "painting", "picture frame", "rug", "curtain", "toilet", "sink",
    "bathtub", "tv", "monitor", "laptop", "keyboard", "mouse", "cell phone", "remote", "camera", "tripod",
    "microphone", "headphones", "guitar", "piano", "violin", "book", "newspaper", "pen", "scissors",
    "toothbrush", "hair drier", "microwave", "oven", "toaster", "fridge", "kettle", "frisbee", "kite",
    "skis", "snowboard", "surfboard", "skateboard", "tennis racket", "baseball bat", "ball", "football",
    "basketball", "goal", "trophy", "medal", "flag", "banner", "poster", "logo", "sign", "balloon",
    "tree", "palm tree", "bush", "grass", "leaf", "rock", "mountain", "hill", "river", "lake", "wave",
    "sky", "cloud", "sun", "moon", "star", "rainbow", "beach", "sand", "snowman", "tent", "bonfire",
    "face", "hand", "eye", "hair", "beard", "uniform", "badge", "medal ribbon", "astronaut", "spacesuit",
    "launch pad", "smoke", "statue", "fountain", "lighthouse", "windmill", "tractor", "barn", "crate", "box",
]
ATTRS = ["red", "blue", "green", "yellow", "black", "white", "grey", "brown", "pink", "orange", "purple",
         "small", "big", "large", "tiny", "old", "new", "wooden", "metal", "plastic", "striped", "spotted",
         "tall", "short", "shiny", "dark", "bright", "empty", "broken", "parked", "sleeping", "running"]
POSITIONS = ["on the left", "on the right", "in the middle", "in the background", "in the foreground",
             "at the top", "at the bottom", "in the corner", "near the edge", "closest to the camera",
             "furthest away", "in the top left", "in the bottom right"]
RELATIONS = ["next to the {o2}", "behind the {o2}", "in front of the {o2}", "under the {o2}", "on the {o2}",
             "holding the {o2}", "wearing a {o2}", "beside the {o2}", "near the {o2}", "with the {o2}",
             "to the left of the {o2}", "to the right of the {o2}", "sitting on the {o2}", "above the {o2}"]
ORDINALS = ["first", "second", "third", "last", "leftmost", "rightmost", "biggest", "smallest", "nearest"]
COLOURS_REAL = ["red", "blue", "green", "yellow", "black", "white", "pink", "purple", "orange", "gold",
                "silver", "teal", "navy blue", "bright red", "pastel green", "dark brown", "turquoise"]
SUBJECTS = [
    "a lighthouse", "a red fox", "a city skyline", "an astronaut riding a horse", "a bowl of ramen",
    "a mountain lake", "a cat wearing a crown", "two dogs playing in the snow", "a vintage car", "a dragon",
    "a cozy cabin", "a robot reading a book", "a field of sunflowers", "a sailboat", "a castle on a hill",
    "a busy market street", "an old man fishing", "a futuristic train", "a hot air balloon", "a tiger",
    "a cup of coffee", "a birthday cake", "a treehouse", "a jellyfish", "a waterfall", "a desert oasis",
    "a snowy village", "a knight in armour", "a bicycle leaning on a wall", "a koala", "a neon sign",
    "a spaceship", "a bowl of fruit", "a medieval map", "a penguin family", "a wooden bridge", "a volcano",
    "a little girl with a kite", "a steam locomotive", "a garden full of roses", "an owl", "a pirate ship",
    "a skateboarder", "a coral reef", "a farmhouse", "a football stadium", "a golden retriever puppy",
    "the Eiffel tower", "a rainy street in Tokyo", "a fantasy forest", "a surfer on a big wave",
    "a plate of pancakes", "a pair of sneakers", "a cyberpunk city", "an elephant", "a campfire",
    "a chess board", "a mountain road", "a hummingbird", "a snowman", "a bookshop", "an underwater city",
]
SETTINGS = ["", "", "at sunset", "at night", "in the rain", "in the snow", "on the moon", "under a starry sky",
            "in a forest", "on a beach", "in the desert", "in space", "in a misty valley", "at dawn",
            "in autumn", "in a busy city", "on a rooftop", "by the sea", "in the mountains", "in a meadow"]
STYLES = ["", "", "", "watercolour", "oil painting", "photorealistic", "pixel art", "in the style of a "
          "children's book", "digital art", "pencil sketch", "anime style", "low poly 3d render",
          "vintage photograph", "cinematic lighting", "minimalist", "studio ghibli style", "isometric",
          "comic book style", "4k, highly detailed", "as a postcard", "impressionist"]
EDIT_TARGET_INTO = ["a cat", "a robot", "a statue", "a snowman", "a tiger", "a bouquet of flowers",
                    "a cactus", "a golden trophy", "a teddy bear", "a sports car", "a pumpkin", "a zebra",
                    "a wooden chair", "a palm tree", "a hot air balloon", "a bench", "a dragon"]
EDIT_LOOKS = ["made of gold", "made of wood", "made of glass", "older", "rusty", "wet", "frozen",
              "covered in snow", "brand new", "like a cartoon", "like marble", "on fire", "transparent",
              "furry", "like it's made of lego", "neon", "muddy", "cleaner"]
EDIT_ADD = ["a hat", "sunglasses", "a crown", "a bow tie", "a scarf", "a moustache", "wings", "a party hat",
            "a santa hat", "a collar", "stripes", "polka dots", "flowers", "a sticker", "snow"]
REGIONS = ["top half", "bottom half", "left half", "right half", "top left quarter", "top right quarter",
           "bottom left quarter", "bottom right quarter", "left third", "right third", "middle",
           "centre", "center", "upper part", "lower part", "top left corner", "bottom right corner",
           "upper right corner", "lower left corner", "middle third", "central square", "top strip",
           "left side", "right side", "top", "bottom", "middle section"]
TOPICS = ["the ocean", "my grandmother", "autumn", "climate change", "the roman empire", "friendship",
          "coffee", "my cat", "dogs", "the moon", "a rainy day", "football", "machine learning", "bread",
          "the french revolution", "space travel", "horses", "my new job", "the bus ride home", "pizza",
          "electric cars", "the city at night", "gardening", "birds", "photosynthesis", "rockets"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "I'll be there at 5", "where is the station?",
         "my dog ate my homework", "the meeting is moved to Monday", "please send me the report",
         "the cat is sleeping on the sofa", "we need more coffee", "happy birthday!", "the bus is late again"]
LANGS = ["French", "German", "Spanish", "Italian", "Japanese", "Chinese", "Portuguese", "Dutch", "Polish"]
FILES = ["photo.jpg", "IMG_4412.JPG", "beach.png", "holiday_pic.jpeg", "scan001.png", "dsc_0193.jpg",
         "pic.webp", "screenshot.png", "image (3).png", "kitchen.jpg", "street.jpg", "portrait.png"]

# -- frames: how people wrap an intent -------------------------------------------------------------
PREFIXES = ["", "", "", "", "", "please ", "can you ", "could you ", "would you ", "hey, ", "hi! ",
            "I need you to ", "i want you to ", "quick one: ", "ok so ", "would you mind, ", "pls ",
            "help me ", "I'd like you to ", "go ahead and ", "for this one, ", "real quick, ", "yo ",
            "Hello. ", "so, ", "right, ", "can u ", "do me a favour and ", "Could you please ",
            "I was wondering if you could ", "is it possible to ", "kindly ", "next: ", "now "]
SUFFIXES = ["", "", "", "", "", "", " please", " thanks", " thank you!", " asap", ", cheers", "?", ".",
            " for me", " in this photo", " in the image", " in this picture", " in my picture",
            " for my presentation", " if you can", " when you get a chance", " :)", "!!",
            " in {file}", " on the attached image", " here", ", thx", " real quick", " for a project"]
LEADS = ["", "", "", "", "", "", "", "I took this photo yesterday. ", "This is from my trip. ",
         "Here's a picture. ", "Got this shot from my phone. ", "So I have this image. ",
         "My friend sent me this. ", "Look at this. ", "Attached is a photo. ", "Context: it's for a blog post. ",
         "I'm working on a slide deck. ", "This is for my kid's school project. ", "ok. ", "New task. "]
LEADS_TEXT = ["", "", "", "", "", "For my blog post: ", "I'm making a birthday card. ", "Quick question. ",
              "My daughter loves animals. ", "This is for a school project. ", "Bored at work. ",
              "I have an idea. ", "Something fun: ", "For a presentation tomorrow, ", "ok new thing. "]
TOOL_NAMES = {"detect": ["the detector", "object detection", "the detection tool", "detect"],
              "segment": ["the segmenter", "segmentation", "SAM", "the masking tool", "segment"],
              "generate": ["the image generator", "text-to-image", "the generator", "diffusion", "generate",
                           "stable diffusion", "the diffusion model", "your image model", "text2img", "the drawing tool"],
              "crop": ["the crop tool", "crop"], "edit": ["the editor", "inpainting", "the edit tool"]}


def _obj(rng: random.Random) -> str:
    o = rng.choice(OBJECTS)
    r = rng.random()
    if r < 0.25:
        return f"{rng.choice(ATTRS)} {o}"
    if r < 0.35:
        return f"{o} {rng.choice(POSITIONS)}"
    return o


def _plural(o: str) -> str:
    last = o.split()[-1]
    irregular = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
                 "sheep": "sheep", "fish": "fish", "deer": "deer", "knife": "knives", "leaf": "leaves",
                 "glasses": "glasses", "sunglasses": "sunglasses", "skis": "skis", "headphones": "headphones"}
    if last in irregular:
        p = irregular[last]
    elif re.search(r"(s|x|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return " ".join([*o.split()[:-1], p])


def _ref(rng: random.Random) -> str:
    """A referring expression: "the man on the left", "the second car", "the dog next to the bench"."""
    o = rng.choice(OBJECTS)
    r = rng.random()
    if r < 0.3:
        return f"the {o} {rng.choice(POSITIONS)}"
    if r < 0.55:
        return f"the {o} " + rng.choice(RELATIONS).format(o2=rng.choice(OBJECTS))
    if r < 0.7:
        return f"the {rng.choice(ORDINALS)} {o}"
    if r < 0.85:
        return f"the {rng.choice(ATTRS)} {o}"
    return f"the {o}"


def _target(rng: random.Random) -> str:
    """An object phrase with an article (or a referring expression)."""
    if rng.random() < 0.45:
        return _ref(rng)
    o = _obj(rng)
    return rng.choice(["the ", "the ", "this ", "that ", "my ", "all the " if rng.random() < 0.5 else "the "]) + o


ACTIONS = ["", "", "", "sleeping", "jumping", "playing with a ball", "wearing sunglasses", "made of glass",
           "floating in the air", "running through a field", "sitting on a bench", "reading a newspaper",
           "surrounded by flowers", "in a teacup", "on a skateboard", "eating ice cream", "flying over a city",
           "covered in moss", "with a red umbrella", "dancing", "at a picnic", "under a tree", "next to a window"]
MEDIA = ["", "", "", "", "a photo of ", "an oil painting of ", "a watercolor of ", "a portrait of ",
         "a cartoon of ", "a sticker of ", "an icon of ", "a poster of ", "concept art of ", "a drawing of ",
         "a realistic photo of ", "a 3d render of ", "a close-up of ", "a logo with ", "a postcard of ",
         "an illustration of ", "a picture of ", "a painting of ", "a landscape with "]
NUMBERS_WORDS = ["two", "three", "four", "five", "a few", "several", "many"]


def _subject(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return rng.choice(SUBJECTS)
    o = rng.choice(OBJECTS)
    if r < 0.55:
        return f"{rng.choice(NUMBERS_WORDS)} {_plural(o)}"
    art = "an" if o[0] in "aeiou" else "a"
    adj = rng.choice(ATTRS) + " " if rng.random() < 0.5 else ""
    if adj:
        art = "an" if adj[0] in "aeiou" else "a"
    return " ".join(f"{art} {adj}{o} {rng.choice(ACTIONS)}".split())


def _prompt(rng: random.Random) -> str:
    parts = [rng.choice(MEDIA) + _subject(rng), rng.choice(SETTINGS)]
    p = " ".join(x for x in parts if x)
    style = rng.choice(STYLES)
    if style:
        p = rng.choice([f"{p}, {style}", f"{p} in {style} style" if " style" not in style else f"{p}, {style}",
                        f"{style} {p}" if rng.random() < 0.3 else f"{p}, {style}"])
    return p


def _region(rng: random.Random) -> str:
    if rng.random() < 0.25:
        a, b = sorted(rng.sample(range(0, 1001, 50), 2))
        c, d = sorted(rng.sample(range(0, 1001, 50), 2))
        return rng.choice([f"{a},{c},{b},{d}", f"({a}, {c}) to ({b}, {d})", f"x {a}-{b}, y {c}-{d}",
                           f"[{a}, {c}, {b}, {d}]", f"from {a},{c} to {b},{d}"])
    return "the " + rng.choice(REGIONS)


def _edit_instruction(rng: random.Random, t: str) -> str:
    """A single edit intent on target phrase ``t`` (needs a mask: segment -> edit)."""
    c = rng.choice(COLOURS_REAL)
    into = rng.choice(EDIT_TARGET_INTO)
    return rng.choice([
        f"remove {t}", f"erase {t}", f"get rid of {t}", f"delete {t} from the photo", f"take out {t}",
        f"photoshop {t} out", f"make {t} disappear", f"clean up {t}", f"wipe {t} off the picture",
        f"replace {t} with {into}", f"swap {t} for {into}", f"turn {t} into {into}", f"change {t} into {into}",
        f"put {into} where {t} is", f"make {t} {c}", f"paint {t} {c}", f"recolour {t} {c}",
        f"recolor {t} to {c}", f"change the colour of {t} to {c}", f"turn {t} {c}", f"colour {t} in {c}",
        f"make {t} look {rng.choice(EDIT_LOOKS)}", f"make {t} look like {into}",
        f"give {t} {rng.choice(EDIT_ADD)}", f"add {rng.choice(EDIT_ADD)} to {t}",
        f"put {rng.choice(EDIT_ADD)} on {t}", f"fill {t} with {c}", f"inpaint {t}",
        f"I want {t} gone", f"{t} should be {c}", f"could {t} be {c} instead", f"edit {t} so it is {c}",
        f"blur out {t}" if rng.random() < 0.3 else f"cover {t} with {rng.choice(EDIT_ADD)}",
        f"hide {t}", f"replace the colour of {t} with {c}", f"make {t} bigger" if rng.random() < 0.2 else f"make {t} {c}",
    ])


# -- intents: label -> template makers ---------------------------------------------------------------
def _detect(rng: random.Random) -> str:
    o, t = _obj(rng), _target(rng)
    ps = _plural(rng.choice(OBJECTS))
    return rng.choice([
        f"find {t}", f"where is {t}", f"where's {t}?", f"locate {t}", f"detect {t}", f"detect all {ps}",
        f"spot {t}", f"box {t}", f"draw a box around {t}", f"draw bounding boxes around the {ps}",
        f"put boxes on every {o}", f"mark every {o}", f"mark {t}", f"highlight where {t} is",
        f"point out {t}", f"point to {t}", f"show me where {t} is", f"can you see {t}? show me where",
        f"is there a {o} in here? point to it", f"are there any {ps}? box them", f"find all the {ps}",
        f"give me the bounding box of {t}", f"bounding boxes for all {ps}", f"localize {t}",
        f"where are the {ps} in this", f"tag every {o}", f"outline {t} with a box", f"circle {t}",
        f"which part of the image has {t}? mark it", f"find me {t}", f"look for {t}", f"search for {t}",
        f"identify and box all {ps}", f"get the coordinates of {t}", f"find every {o} you can",
        "detect objects", "detect everything in the picture", "box all the objects you can find",
        "label the objects with boxes", "run object detection", f"where exactly is {t}?",
        f"pinpoint {t}", f"show the location of {t}", f"can you find {t} for me", f"track down {t}",
        f"{t}, where?", f"{ps} - find them", f"mark the position of {t}", f"which one is {t}? box it",
    ])


def _segment(rng: random.Random) -> str:
    o, t = _obj(rng), _target(rng)
    return rng.choice([
        f"segment {t}", f"mask {t}", f"give me a mask of {t}", f"make a mask for {t}", f"cut out {t}",
        f"cut {t} out", f"isolate {t}", f"extract {t} from the background", f"separate {t} from the background",
        f"make a silhouette of {t}", f"outline {t} precisely", f"trace the outline of {t}",
        f"select the pixels of {t}", f"select {t}", f"pixel mask of {t}", f"segmentation mask for {t}",
        f"produce a binary mask of {t}", f"mask out {t}", f"get the shape of {t} as a mask",
        "separate the foreground from the background", "segment the foreground", "mask the background",
        "cut out the subject", "segment the object at the centre", "mask whatever is at the point 300,400",
        "segment everything", f"give me the exact outline of every {o}", f"mask all the {_plural(o)}",
        f"I need a cutout of {t}", f"clip {t} out as a mask", f"make {t} its own layer",
        f"lasso {t}", f"do a precise selection of {t}", f"which pixels belong to {t}? mask them",
        "segment the thing at the top left", "mask the region around the click at (120, 80)",
        f"carve out {t}", f"trace {t}", f"get me a transparent cutout of {t}", f"isolate the {o} only",
    ])


def _crop(rng: random.Random) -> str:
    r = _region(rng)
    return rng.choice([
        f"crop {r}", f"crop to {r}", f"crop the image to {r}", f"crop the picture: {r}", f"keep only {r}",
        f"trim the image down to {r}", f"cut the image down to {r}", f"crop out {r}", f"zoom into {r}",
        f"zoom in on {r}", f"just give me {r} of the image", f"crop it to {r} please", f"crop {r} of this",
        "crop this to a square", "crop the middle", "crop away the edges", "trim the borders",
        "crop to the centre square", f"make a crop of {r}", f"show only {r}", f"cut off everything except {r}",
        f"cut {r} out of the picture", f"I only want {r}, crop it", f"crop region {r}", f"crop box {r}",
    ])


GEN_OPTIONS = ["with seed 42", "seed=7", "at 512x512", "size 256", "in 20 steps", "30 steps", "guidance 7.5",
               "negative prompt: blurry, text", "no text", "square format", "16:9", "portrait orientation",
               "high resolution", "save it as out.png", "make it colorful", "keep it simple", "make it dark and moody",
               "use a wide angle", "no people in it", "bright colours please", "in black and white", "as a png"]
GEN_CONTEXT = ["I'm writing a children's book and need an illustration:", "For our newsletter header:",
               "My friend's birthday is tomorrow, so", "I run a small bakery.", "I'm designing a game level.",
               "We're making a slide about travel.", "Just for fun:", "For my D&D campaign,",
               "I need a phone background.", "Working on a presentation about climate.", "For a book cover,"]


VISUALS = ["an avatar", "a profile picture", "a thumbnail for my video", "a banner for my website", "an emoji",
           "an icon", "a wallpaper", "a poster", "a book cover", "a sticker", "a greeting card picture",
           "a tattoo design", "a mascot", "a character design", "concept art", "a storyboard frame",
           "a seamless texture", "a background image", "an album cover", "a birthday card image", "a logo",
           "a comic panel", "a coloring page", "a movie poster", "a postcard image", "a header image"]


def _generate(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:  # a bare description, as people paste prompts
        return _prompt(rng)
    if r < 0.27:
        v, p = rng.choice(VISUALS), _prompt(rng)
        return rng.choice([f"make {v} of {p}", f"design {v} showing {p}", f"create {v} with {p}",
                           f"I need {v}: {p}", f"generate {v} of {p}", f"draw {v} featuring {p}",
                           f"can you make me {v} with {p}", f"{v} of {p}, please"])
    s = _generate_core(rng)
    if rng.random() < 0.2:
        s = f"{s}, {rng.choice(GEN_OPTIONS)}" if rng.random() < 0.5 else f"{s}. {rng.choice(GEN_OPTIONS).capitalize()}."
    if rng.random() < 0.12:
        s = f"{rng.choice(GEN_CONTEXT)} {s}"
    return s


def _generate_core(rng: random.Random) -> str:
    p = _prompt(rng)
    return rng.choice([
        f"generate an image of {p}", f"draw {p}", f"paint {p}", f"make a picture of {p}", f"create {p}",
        f"sketch {p}", f"render {p}", f"illustrate {p}", f"make me an illustration of {p}",
        f"I need a picture of {p}", f"I'd love an image showing {p}", f"can you draw me {p}",
        f"produce an image: {p}", f"image of {p}", f"picture of {p} please", f"a photo of {p}",
        f"create a wallpaper with {p}", f"design a poster showing {p}", f"make art of {p}",
        f"generate a photo of {p}", f"show me a picture of {p}", f"imagine {p} and draw it",
        f"text to image: {p}", f"prompt: {p}", f"{p}", f"{p}, please generate", f"draw me {p}",
        f"can I get an image of {p}", f"visualize {p}", f"paint me a picture of {p}",
        f"generate artwork: {p}", f"make a drawing of {p}", f"new image: {p}", f"dream up {p}",
        f"ignore the attached photo and draw {p}", f"create an image from scratch of {p}",
        f"come up with a picture of {p}", f"generate {p}", f"make {p} as an image",
        f"give me an image of {p}", f"I want a picture of {p}", f"could you render {p}",
        f"make an illustration for my blog: {p}", f"produce art of {p}", f"draw something: {p}",
        f"paint a picture of {p}", f"create a realistic photo of {p}", f"generate {p} for me",
        f"I'd like to see {p} - can you make it?", f"make me a wallpaper of {p}", f"an image with {p}",
        f"can you create a picture where there is {p}", f"need artwork showing {p}", f"picture: {p}",
        f"generate a new picture: {p}", f"make a cover image of {p}", f"design an image of {p}",
        f"draw {p} for my kid", f"would love a drawing of {p}", f"create an illustration showing {p}",
        f"make a cute picture of {p}", f"image generation: {p}", f"what would {p} look like? draw it",
        f"turn this idea into an image: {p}", f"visualise {p} as a picture", f"create art: {p}",
        f"whip up an image of {p}", f"conjure up {p}", f"cook up a picture of {p}", f"show me {p}",
        f"I want to see {p}", f"can I have a picture of {p}", f"make me {p}", f"give me {p}",
        f"envision {p} and make an image", f"mock up {p}", f"depict {p}", f"portray {p} in an image",
        f"a picture showing {p}, please", f"photograph of {p}", f"art piece: {p}", f"imagine {p}",
        f"I need an image for my website showing {p}", f"could I get some art of {p}",
        f"use the image generator to make {p}", f"make a new image (not from a photo) of {p}",
    ])


def _edit(rng: random.Random) -> str:
    return _edit_instruction(rng, _target(rng))


def _detect_crop(rng: random.Random) -> str:
    t = _target(rng)
    return rng.choice([
        f"crop to {t}", f"crop around {t}", f"crop out {t}", f"crop the image to {t}", f"zoom in on {t}",
        f"give me a close-up of {t}", f"find {t} and crop it", f"crop {t} into its own image",
        f"locate {t}, then crop to it", f"tight crop of {t}", f"frame {t} and crop", f"crop each {rng.choice(OBJECTS)}",
        f"detect {t} and crop the box", f"I want a crop of just {t}", f"find {t} and zoom in on it",
    ])


def _detect_segment(rng: random.Random) -> str:
    t = _target(rng)
    return rng.choice([
        f"find {t} and mask it", f"detect {t}, then segment it", f"locate {t} and give me its mask",
        f"box {t} and then cut it out", f"find {t} first, then outline it precisely",
        f"detect {t} and then make a pixel mask", f"spot {t} and segment it", f"look for {t}, then mask it",
    ])


def _segment_edit_explicit(rng: random.Random) -> str:
    t = _target(rng)
    instr = _edit_instruction(rng, "it")
    return rng.choice([f"cut out {t} and {instr}", f"mask {t}, then {instr}", f"segment {t} and {instr}",
                       f"give me the mask of {t}, and then {instr}", f"select {t} and {instr}",
                       f"isolate {t} then {instr}"])


def _detect_segment_edit(rng: random.Random) -> str:
    t = _target(rng)
    instr = _edit_instruction(rng, "it")
    return rng.choice([f"find {t}, mask it and {instr}", f"detect {t}, segment it, then {instr}",
                       f"locate {t}, cut it out and {instr}", f"box {t}, mask it, then {instr}"])


def _generate_then(rng: random.Random, nxt: Label) -> str:
    p, t, r = _prompt(rng), _target(rng), _region(rng)
    g = rng.choice(["generate", "draw", "make a picture of", "create", "paint", "render", "generate an image of"])
    then = rng.choice([", then", " and then", " and", ". Then", ", after that"])
    if nxt == ("detect",):
        tail = rng.choice([f"find {t} in it", f"box {t}", f"locate {t}", f"detect {t} in the result"])
    elif nxt == ("segment",):
        tail = rng.choice([f"mask {t}", f"segment {t}", f"cut out {t}", f"give me a mask of {t} in it"])
    elif nxt == ("crop",):
        tail = rng.choice([f"crop {r}", f"crop it to {r}", f"zoom into {r}"])
    elif nxt == ("segment", "edit"):
        tail = _edit_instruction(rng, t)
    elif nxt == ("detect", "crop"):
        tail = rng.choice([f"crop to {t}", f"crop around {t}", f"zoom in on {t}"])
    else:
        raise ValueError(nxt)
    return f"{g} {p}{then} {tail}"


def _crop_then(rng: random.Random, nxt: Label) -> str:
    r, t = _region(rng), _target(rng)
    tail = {("detect",): rng.choice([f"find {t} in it", f"box {t} there", f"detect {t} in the crop"]),
            ("segment",): rng.choice([f"mask {t} in it", f"segment {t}", f"cut out {t} from the crop"])}[nxt]
    return rng.choice([f"crop {r} and then {tail}", f"first crop to {r}, then {tail}", f"zoom into {r} and {tail}"])


INTENTS: dict[Label, Callable[[random.Random], str]] = {
    ("detect",): _detect,
    ("segment",): _segment,
    ("crop",): _crop,
    ("generate",): _generate,
    ("segment", "edit"): lambda rng: (_edit(rng) if rng.random() < 0.85 else _segment_edit_explicit(rng)),
    ("detect", "crop"): _detect_crop,
    ("detect", "segment"): _detect_segment,
    ("detect", "segment", "edit"): _detect_segment_edit,
    ("generate", "detect"): lambda rng: _generate_then(rng, ("detect",)),
    ("generate", "segment"): lambda rng: _generate_then(rng, ("segment",)),
    ("generate", "crop"): lambda rng: _generate_then(rng, ("crop",)),
    ("generate", "segment", "edit"): lambda rng: _generate_then(rng, ("segment", "edit")),
    ("generate", "detect", "crop"): lambda rng: _generate_then(rng, ("detect", "crop")),
    ("crop", "detect"): lambda rng: _crop_then(rng, ("detect",)),
    ("crop", "segment"): lambda rng: _crop_then(rng, ("segment",)),
}
# how often each intent is drawn (relative)
INTENT_WEIGHTS: dict[Label, float] = {
    ("detect",): 6, ("segment",): 6, ("crop",): 4, ("generate",): 6, ("segment", "edit"): 6,
    ("detect", "crop"): 2.5, ("detect", "segment"): 1.2, ("detect", "segment", "edit"): 1,
    ("generate", "detect"): 0.8, ("generate", "segment"): 0.8, ("generate", "crop"): 0.6,
    ("generate", "segment", "edit"): 0.6, ("generate", "detect", "crop"): 0.5,
    ("crop", "detect"): 0.5, ("crop", "segment"): 0.4,
}


# -- no expert ---------------------------------------------------------------------------------------
def _none_image(rng: random.Random) -> str:
    """About the attached image, but nothing an expert does (answered directly or declined)."""
    o, t = rng.choice(OBJECTS), _target(rng)
    return rng.choice([
        "describe this photo", "what's in this picture?", "write a caption for this image",
        "caption this", "give me alt text for this picture", "what is going on in this image?",
        f"what breed is {t}?", f"what colour is {t}?", f"what kind of {o} is this?", f"is {t} {rng.choice(ATTRS)}?",
        "what decade is this photo from?", "where was this photo taken?", "who is this person?",
        f"how old does {t} look?", f"what is {t} doing?", f"why is {t} there?", "is this photo real or fake?",
        "was this picture made by an AI?", "classify this image", "what category does this image belong to?",
        "estimate the depth of this scene", "make a depth map of the photo", "predict the depth for each pixel",
        f"estimate the pose of {t}", "detect the keypoints of the person's body", "what emotion is on the face?",
        "upscale this image to 4k", "increase the resolution", "sharpen this photo", "denoise this picture",
        "make the whole photo look like a van gogh painting", "apply a vintage filter to the whole image",
        "turn this photo into a watercolour painting", "convert the image to black and white",
        "colourise this old black and white photo", "blur the background", "add a bokeh effect",
        "turn this image into a 3d model", "make a 3d mesh from this picture", "animate this photo",
        "make a short video from this image", "make the picture move", "rotate the image 90 degrees",
        "flip the picture horizontally", "resize it to 800x600", "convert this to a png", "compress this jpeg",
        "what's the text on the sign?" if rng.random() < 0.1 else "rate this photo out of 10",
        "is this a good composition?", "what camera settings were used for this?", "tell me about this picture",
        f"does {t} look healthy?", f"is {t} real?", "what would you title this photo?",
        "write a poem inspired by this picture", "what time of day is it in this photo?",
        "what's the weather in this picture?", "summarise what you see", "give me a one-line description",
        "is this image safe for work?", "what style is this painting?", "which city is this?",
        f"what is the {o} made of?", f"how much does {t} cost?", "recognise the face in this photo",
        "who painted this?", "what's the mood of this image?", "identify the species", "what animal is this?",
        "read the licence plate" if rng.random() < 0.1 else "what language is on the poster?",
        "what's the dominant colour of this image?", "find similar images online", "reverse image search this",
        "estimate the distance to the bus", "measure how tall the building is", "how far away is the person?",
        "remove the noise from the whole image", "enhance the image quality", "fix the lighting of the photo",
        "make the photo brighter overall", "increase the contrast", "straighten the horizon",
        "describe the person's outfit", f"tell me a story about {t}", "translate the caption into French",
    ])


def _none_text(rng: random.Random) -> str:
    """Text, code, maths, chat and knowledge requests, many with an expert's verb or a real-world word."""
    o, topic, text, lang = rng.choice(OBJECTS), rng.choice(TOPICS), rng.choice(TEXTS), rng.choice(LANGS)
    ps = _plural(o)
    return rng.choice([
        # shared verbs
        f"generate a poem about {topic}", f"generate a list of names for my {o}", "generate a strong password",
        f"generate a SQL query to count {ps}", "generate ideas for a birthday party", f"generate a story about {topic}",
        "draw conclusions from these results", "draw up a contract for a freelancer", "draw a parallel between rome and us",
        "detect the language of this sentence", f"detect the sentiment of '{text}'", "detect anomalies in my sales data",
        "segment my customers by age", "segment this market for me", "how do I segment a linked list?",
        "crop rotation tips for small farms", "what is crop insurance?", "best crops to plant in spring",
        "edit my essay", "edit this paragraph for grammar", "can you edit my cover letter?", "proofread and edit this email",
        "render this markdown", "render a latex formula for the area of a circle", "how does react render components?",
        "isolate x in 3x + 5 = 20", "how do I isolate a failing test?", "how to mask my ip address",
        "mask the phone numbers in this log", "cut out carbs from my diet?", "how do I cut out sugar?",
        "outline an essay about " + topic, "outline the plot of hamlet", "sketch out a plan for my week",
        f"find the capital of {rng.choice(['France', 'Peru', 'Japan', 'Canada'])}", "find the bug in this code",
        "find a recipe for banana bread", f"find me a good book about {topic}", "where is the Eiffel tower?",
        "where can I buy a cheap bicycle?", "locate the nearest pharmacy", "box breathing technique explained",
        "remove duplicates from this list", f"replace every '{o}' with '{rng.choice(OBJECTS)}' in my text",
        "remove the stop words from this sentence", "change the tone of this email to formal", "crop circles: real or fake?",
        "paint my room: which colour goes with oak floors?", "how do I paint a fence?", "create a spreadsheet formula",
        "create a python function to reverse a string", "make a list of groceries", "make a todo app in javascript",
        "picture this: you are a pirate. tell me your story", "imagine a world without cars - write an essay",
        "describe a sunset in words", "write a haiku about a cat", "compose a song about the sea",
        "cut this paragraph in half", "trim the whitespace in this string", "extract the emails from this text",
        "highlight the key points of this article", "mark this conversation as important", "point out my mistakes",
        "select all rows where age > 30", "segment fault in C, what does it mean?", "what does the crop command do in ffmpeg?",
        "detect objects in a video stream with opencv - how?", "how do image generators work?", "explain how segmentation models work",
        # plain
        f"translate '{text}' into {lang}", f"summarise this article about {topic}", "tldr of the last message",
        "what's 17 times 23?", "solve x^2 - 5x + 6 = 0", "convert 5 miles to km", "what's the square root of 144?",
        "tell me a joke", "how are you today?", "good morning!", "thanks, that's all", "who are you?",
        "what can you do?", "what tools do you have?", "bye", "lol", "ok", "nice work", "you're great",
        f"how long do {ps} live?", f"what do {ps} eat?", f"how fast can a {o} go?", f"tell me a fact about {ps}",
        f"what's the history of the {o}?", f"is a {o} a good gift?", f"how much does a {o} weigh?",
        f"write a product description for a {rng.choice(ATTRS)} {o}", f"what rhymes with {o}?",
        f"spell {o} backwards", f"how do you say {o} in {lang}?", f"give me synonyms for {o}",
        "recommend a movie for tonight", "plan a 3 day trip to rome", "what's the weather tomorrow?",
        "set a timer for 10 minutes", "play some jazz", "read this text aloud", "transcribe this audio file",
        "make a podcast intro", "compose a melody", "convert this speech to text", "generate a ringtone",
        "write a python script to rename files", "fix this javascript error: undefined is not a function",
        "explain recursion", "what's the difference between tcp and udp?", "write a regex for emails",
        "who won the world cup in 2018?", "when was the bus invented?", "who was grace hopper?",
        "what is the speed of light?", "how many legs does a spider have?", "what's the tallest building?",
        "help me write a birthday message", "draft a tweet about our launch", "write a cover letter",
        "make a video about cooking", "edit my video", "cut the first 10 seconds of the clip",
        "create a 3d model of a chair", "name my bakery", "write a slogan for my bakery",
    ])


def _none_creative_text(rng: random.Random) -> str:
    """Text about the same content a picture prompt has: a poem, a story, a description in words."""
    p = _prompt(rng).split(",")[0]
    return rng.choice([f"write a poem about {p}", f"tell me a story about {p}", f"describe {p} in words",
                       f"write a short paragraph about {p}", f"give me a title for a story about {p}",
                       f"write a song about {p}", f"what would {p} sound like?", f"write a haiku about {p}",
                       f"generate a story about {p}", f"brainstorm names for {p}", f"is {p} realistic?",
                       f"write an instagram caption about {p}", f"explain {p} to a child",
                       f"how would you describe {p}?", f"write a limerick about {p}", f"give me facts about {p}"])


def _image_request_without_image(rng: random.Random) -> tuple[str, Label]:
    """Image-only intents asked with no image attached, labelled with their intent: the router says
    what is asked, and ``Router.route_batch`` turns a route whose first expert needs an image into
    "needs an image" (no call) when none is attached. Labelling them "no expert" taught the head that
    content words without an image mean no call, which pulled "draw an elephant playing the piano" there."""
    maker, label = rng.choice([(_detect, ("detect",)), (_segment, ("segment",)), (_crop, ("crop",)),
                               (_edit, ("segment", "edit"))])
    return maker(rng), label


# -- noise ---------------------------------------------------------------------------------------------
def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1:]
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("aeiourstnl") + word[i + 1:]


def dress(text: str, rng: random.Random, *, label: Label = (), image: bool = True) -> str:
    """Wrap a request the way people write: lead-ins, politeness, suffixes, tool names, typos, casing."""
    s = text
    if label and rng.random() < 0.06:
        name = rng.choice(TOOL_NAMES.get(label[0], [label[0]]))
        s = rng.choice([f"use {name} to {s}", f"with {name}: {s}", f"{s} (use {name})", f"run {name}: {s}"])
    if rng.random() < 0.45:
        s = rng.choice(PREFIXES) + s
    if rng.random() < 0.35:
        suf = rng.choice(SUFFIXES)
        if "{file}" in suf:
            suf = suf.format(file=rng.choice(FILES)) if image else ""
        if not image and any(w in suf for w in ("photo", "image", "picture", "attached")):
            suf = ""
        s = s.rstrip("?.!") + suf
    if rng.random() < 0.15:
        s = rng.choice(LEADS if image else LEADS_TEXT) + s[:1].upper() + s[1:]
    if rng.random() < 0.12:
        words = s.split(" ")
        k = rng.randrange(len(words))
        words[k] = _typo(words[k], rng)
        s = " ".join(words)
    r = rng.random()
    if r < 0.3:
        s = s.lower()
    elif r < 0.5:
        s = s[:1].upper() + s[1:]
    elif r < 0.53:
        s = s.upper()
    return " ".join(s.split())


# -- assembling a data set -----------------------------------------------------------------------------
def _slot_values(rng: random.Random) -> dict[str, str]:
    obj = _obj(rng) if rng.random() < 0.6 else _ref(rng).removeprefix("the ")
    return {"object": obj, "colour": rng.choice(COLOURS_REAL), "shape": rng.choice(OBJECTS),
            "prompt": _prompt(rng), "text": rng.choice(TEXTS), "instruction": _edit_instruction(rng, "it"),
            "image": rng.choice(FILES) if rng.random() < 0.2 else "the image", "colour2": rng.choice(COLOURS_REAL),
            "shape2": rng.choice(OBJECTS), "region": _region(rng), "file": rng.choice(FILES)}


def _fmt(template: str, values: dict[str, str]) -> str:
    class Safe(dict):
        def __missing__(self, key: str) -> str:
            return key

    return template.format_map(Safe(values))


def registry_requests(rng: random.Random, n: int, registry: Any = None) -> list[tuple[str, bool, Label]]:
    """Each registered expert's train-split ``examples`` and ``phrasings`` (and the core data's chain
    phrasings), filled with real-world content."""
    from switchboard.expert import artifact_fields
    from training.core_data import CHAINS, Generator, in_split

    gen = Generator(registry, split="train", seed=0, n_scenes=16)
    singles: list[tuple[str, str, bool]] = []
    for name, exs in gen.examples.items():
        cls = gen.registry.get_class(name)
        kinds = artifact_fields(cls.Args)
        needs_image = "image" in kinds.values()
        for ex in exs:
            if any(k in kinds and v != "{image}" for k, v in ex.args.items()):
                continue  # needs an artifact the request cannot supply (edit's mask): covered by chains
            singles.append((name, ex.request, needs_image))
        for ex in gen.phrasings.get(name, []):
            singles.append((name, ex.request, needs_image))
    chains = [(c.experts, r, c.image) for c in CHAINS if all(e in gen.registry for e in c.experts)
              for r in in_split(c.requests, "train") + list(c.extra)]
    out = []
    base = rng.random()
    for i in range(n):
        rng = random.Random(f"registry:{base}:{i}")
        if chains and rng.random() < 0.35:
            label, tmpl, image = rng.choice(chains)
        else:
            name, tmpl, image = rng.choice(singles)
            label = (name,)
        text = dress(_fmt(tmpl, _slot_values(rng)), rng, label=label, image=image)
        out.append((text, image, tuple(label)))
    return out


def core_requests(n: int, seed: int = 0, registry: Any = None) -> list[tuple[str, bool, Label]]:
    """Shapes-world requests from the core's TRAIN split (first user turn of call/chain/none samples)."""
    from training.core_data import Generator

    gen = Generator(registry, split="train", seed=seed, n_scenes=400)
    out = []
    kinds = ["call"] * 36 + ["chain"] * 16 + ["none"] * 29
    rng = random.Random(f"router-core:{seed}")
    while len(out) < n:
        s = gen.generate(1, rng.choice(kinds))[0]
        if s.kind not in ("call", "chain", "none") or len(s.messages) != 1:
            continue
        msg = s.messages[-1]
        label = tuple(c["expert"] for c in s.calls)
        if s.source.startswith("no_image:"):  # an image intent without the image: its intent (see above)
            label = (s.source.split(":", 1)[1],)
        out.append((msg["content"], bool(msg.get("images")), label))
    return out


def real_requests(rng: random.Random, n: int) -> list[tuple[str, bool, Label]]:
    """Real-world intents and no-expert requests from the vocabularies above."""
    labels = list(INTENT_WEIGHTS)
    weights = [INTENT_WEIGHTS[x] for x in labels]
    out = []
    base = rng.random()
    for i in range(n):
        rng = random.Random(f"real:{base}:{i}")
        r = rng.random()
        if r < 0.58:
            label = rng.choices(labels, weights)[0]
            image = label[0] != "generate" or rng.random() < 0.08
            text = INTENTS[label](rng)
        elif r < 0.74:
            label, image, text = (), True, _none_image(rng)
        elif r < 0.95:
            label, image, text = (), rng.random() < 0.3, _none_text(rng)
        else:
            text, intent = _image_request_without_image(rng)
            out.append((dress(text, rng, label=(), image=False), False, intent))
            continue
        out.append((dress(text, rng, label=label, image=image), image, label))
    return out


def build(n_real: int = 24000, n_registry: int = 6000, n_core: int = 6000, seed: int = 0,
          registry: Any = None) -> list[tuple[str, bool, Label]]:
    """The router's training set: (request, has_image, expert sequence), deduplicated, shuffled."""
    rng = random.Random(f"router:{seed}")
    rows = real_requests(rng, n_real) + registry_requests(rng, n_registry, registry)
    if n_core:
        rows += core_requests(n_core, seed, registry)
    seen: dict[tuple[str, bool], Label] = {}
    for text, image, label in rows:
        seen.setdefault((text, image), label)
    out = [(t, i, lab) for (t, i), lab in seen.items()]
    rng.shuffle(out)
    return out


def label_counts(rows: Sequence[tuple[str, bool, Label]]) -> dict[str, int]:
    from collections import Counter

    return {" > ".join(k) or "(none)": v for k, v in Counter(r[2] for r in rows).most_common()}


def plugin_requests(rng: random.Random, n: int, cls: Any) -> list[tuple[str, bool, Label]]:
    """Requests for one plugin (``--adapt``): its train-split ``examples`` and ``phrasings`` filled
    with real-world content and dressed like the rest; an image plugin asked without an image is
    labelled ``()``."""
    from switchboard.expert import artifact_fields
    from training.core_data import in_split, not_near

    kinds = artifact_fields(cls.Args)
    needs_image = "image" in kinds.values()
    requests = [e.request for e in in_split(cls.examples, "train")
                if not any(k in kinds and v != "{image}" for k, v in e.args.items())]
    requests += list(not_near(cls.phrasings, [e.request for e in cls.examples]))[:400] if cls.phrasings else []
    out: list[tuple[str, bool, Label]] = []
    if not requests:
        return out
    base = rng.random()
    for i in range(n):
        r = random.Random(f"plugin:{cls.name}:{base}:{i}")
        image = needs_image and r.random() > 0.1 or (not needs_image and r.random() < 0.3)
        label: Label = (cls.name,) if image or not needs_image else ()
        text = dress(_fmt(r.choice(requests), _slot_values(r)), r, label=(cls.name,), image=image)
        out.append((text, image, label))
    return out
