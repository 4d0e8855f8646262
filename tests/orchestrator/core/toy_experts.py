"""Toy plugins for the router's zero-shot check: experts the router never saw in training.

Only their ``description`` and ``examples`` describe them (as for a plugin installed after the
router was trained). ``HELD_OUT`` holds other requests for each (never in ``examples``, never in any
training data): the share of them routed to the plugin measures zero-shot routing.
"""

from __future__ import annotations

from pydantic import BaseModel

from switchboard.expert import Example, Expert, ExpertResult, ImageRef


class ImageArgs(BaseModel):
    image: ImageRef


class DepthExpert(Expert):
    name = "depth"
    description = "Estimate per-pixel depth (distance from the camera) of a photo; returns a depth map."
    Args = ImageArgs
    Result = ExpertResult
    examples = [
        Example(request="estimate the depth of this photo", args={"image": "{image}"}),
        Example(request="make a depth map", args={"image": "{image}"}),
        Example(request="how far from the camera is each part of the picture?", args={"image": "{image}"}),
        Example(request="predict depth for every pixel", args={"image": "{image}"}),
        Example(request="which parts of the scene are near and which are far?", args={"image": "{image}"}),
    ]


class CaptionExpert(Expert):
    name = "caption"
    description = "Write a one-sentence caption describing what an image shows."
    Args = ImageArgs
    Result = ExpertResult
    examples = [
        Example(request="caption this image", args={"image": "{image}"}),
        Example(request="describe the picture in one sentence", args={"image": "{image}"}),
        Example(request="what does this photo show?", args={"image": "{image}"}),
        Example(request="write alt text for the image", args={"image": "{image}"}),
        Example(request="give me a short description of the photo", args={"image": "{image}"}),
    ]


class ReadTextExpert(Expert):
    """An OCR-like plugin: its examples share "this image" / "the picture" with describe questions."""

    name = "readtext"
    description = "Read the text in an image (signs, labels, documents); returns the text."
    Args = ImageArgs
    Result = ExpertResult
    examples = [
        Example(request="read the text in this picture", args={"image": "{image}"}),
        Example(request="what text is in the image?", args={"image": "{image}"}),
        Example(request="what does the sign say", args={"image": "{image}"}),
        Example(request="transcribe the writing", args={"image": "{image}"}),
        Example(request="extract the text from this image", args={"image": "{image}"}),
    ]


# Held-out requests (with an image attached): different wording from the examples above.
HELD_OUT = {
    "depth": [
        "generate a depth image from my photo",
        "I need the depth information for this shot",
        "compute a disparity map please",
        "can you tell how deep the scene is at each point",
        "depth estimation on the attached picture",
        "produce a monocular depth estimate",
        "show me what is close to the lens and what is far away",
        "run depth prediction on IMG_2231.jpg",
        "give me the z-buffer of this photograph",
        "estimate the distance of every pixel from the camera",
        "I want a heatmap of depth for this landscape",
        "turn this picture into a depth map for my 3d parallax effect",
        "how far away are things in this image, per pixel?",
        "depth map of the street scene please",
        "predict the scene geometry as a depth map",
        "estimate relative depth in this room photo",
        "could you make me a grayscale depth render of the picture",
        "what's the depth layout of this image",
        "compute depth for the attached frame",
        "please infer per-pixel distance for this photo",
    ],
    "caption": [
        "write a caption for my photo",
        "what's happening in this picture? one line please",
        "describe this image briefly",
        "generate a caption for the attached image",
        "summarize the photo in a sentence",
        "alt text for this screenshot please",
        "tell me in a few words what this picture shows",
        "caption the image for instagram",
        "can you describe what you see in the photo",
        "give this picture a descriptive caption",
        "one-sentence description of IMG_0042.jpg",
        "what is shown here?",
        "describe the scene in the picture",
        "write an image description for accessibility",
        "sum up what's in this photo",
        "a short caption for this image, please",
        "what does the attached picture depict?",
        "explain what this photograph shows",
        "describe the contents of this image",
        "provide a caption describing the photo",
    ],
}
