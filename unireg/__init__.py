"""UniReg: a prompt-controllable foundation model for deformable 3-D CT registration."""
__version__ = "0.1.0"

from .api import UniReg  # noqa: E402
from .config import UniRegConfig  # noqa: E402
from .prompt import Prompt, PromptError, parse_prompt  # noqa: E402
from .result import RegistrationResult  # noqa: E402

__all__ = ["UniReg", "UniRegConfig", "Prompt", "PromptError", "parse_prompt", "RegistrationResult"]
