"""switchboard-ocr: a Switchboard expert plugin that reads text in images.

Registered through the ``switchboard.experts`` entry-point group as ``ocr``. Importing this package is
cheap; the OCR engine loads in ``OcrExpert.setup()`` on first use.
"""

from switchboard_ocr.expert import OcrArgs, OcrExpert, OcrLine, OcrResult

__all__ = ["OcrArgs", "OcrExpert", "OcrLine", "OcrResult"]
__version__ = "0.1.0"
