"""PedCLIP as an installed package. `import pedclip` registers its classes with transformers' Auto classes, so a
saved PedCLIP folder or Hub repo loads with `AutoModel.from_pretrained(path)` and no `trust_remote_code`."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from configuration_pedclip import (
    DEFAULT_BODY_PARTS,
    DICOM_BODY_PART_TERMS,
    PedCLIPConfig,
    PedCLIPTextConfig,
    PedCLIPVisionConfig,
)
from modeling_pedclip import PedCLIPModel, PedCLIPOutput, PedCLIPVisionModel
from processing_pedclip import PedCLIPImageProcessor, PedCLIPProcessor

AutoConfig.register(PedCLIPConfig.model_type, PedCLIPConfig, exist_ok=True)
AutoConfig.register(PedCLIPVisionConfig.model_type, PedCLIPVisionConfig, exist_ok=True)
AutoConfig.register(PedCLIPTextConfig.model_type, PedCLIPTextConfig, exist_ok=True)
AutoModel.register(PedCLIPConfig, PedCLIPModel, exist_ok=True)
AutoModel.register(PedCLIPVisionConfig, PedCLIPVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(PedCLIPConfig, PedCLIPModel, exist_ok=True)
AutoImageProcessor.register(PedCLIPConfig, image_processor_classes={"pil": PedCLIPImageProcessor}, exist_ok=True)
AutoProcessor.register(PedCLIPConfig, PedCLIPProcessor, exist_ok=True)

__all__ = [
    "DEFAULT_BODY_PARTS", "DICOM_BODY_PART_TERMS", "PedCLIPConfig", "PedCLIPImageProcessor", "PedCLIPModel",
    "PedCLIPOutput", "PedCLIPProcessor", "PedCLIPTextConfig", "PedCLIPVisionConfig", "PedCLIPVisionModel",
]  # fmt: skip
