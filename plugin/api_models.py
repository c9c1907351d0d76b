"""Request bodies of the control plane (``/v1/processfork/...``).

Unknown fields are refused (400, naming the field and the closest known one): a misspelt
``promt`` must not turn a snapshot of one prompt into a snapshot of the whole engine.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

__all__ = ["MAX_REVISION_CHARS", "CheckoutBody", "ForkBody", "RepairBody", "SnapshotBody"]

#: A revision (cid, prefix, ref name with ~N or @{N}) longer than this cannot name a snapshot: ref
#: names stop at 255 bytes and a cid has 71 characters. (It also bounds the work of parsing one.)
MAX_REVISION_CHARS = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_absent(cls, data: Any) -> Any:
        """`"token_ids": null` must not read as "no source" (a snapshot of everything)."""
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None and k in cls.model_fields)
            if nulls:
                raise ValueError(f"{', '.join(nulls)}: null is not a value; leave the field out")
        return data


class SnapshotBody(_Body):
    """What to capture: one of ``prompt``, ``messages``, ``token_ids``, ``request_id``,
    or none of them for the engine's whole resident state."""

    name: str = Field(min_length=1, max_length=255)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[StrictInt] | None = None
    request_id: str | None = None
    parent: str | None = Field(default=None, max_length=MAX_REVISION_CHARS)
    message: str | None = None
    # With `messages`, as in a chat completion request: they shape the rendered tokens.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SnapshotBody:
        given = [
            k for k in ("prompt", "messages", "token_ids", "request_id") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one of prompt, messages, token_ids, request_id (got {given})")
        if self.token_ids is not None and (not self.token_ids or min(self.token_ids) < 0):
            raise ValueError("token_ids must be a non-empty list of non-negative integers")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        chat_only = [k for k in ("tools", "tool_choice", "add_generation_prompt",
                                 "continue_final_message", "chat_template_kwargs")
                     if getattr(self, k) is not None]
        if chat_only and self.messages is None:
            raise ValueError(f"{', '.join(chat_only)} apply to messages only")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            for i, message in enumerate(self.messages):
                if not isinstance(message.get("role"), str):
                    raise ValueError(f"messages[{i}].role must be a string")  # noqa: TRY004
                if not isinstance(message.get("content"), (str, list, type(None))):
                    raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as 422
                        f"messages[{i}].content must be a string or a list of parts"
                    )
        return self


class ForkBody(_Body):
    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)
    n: StrictInt = Field(ge=1, le=4096)  # `true` and `2.0` are not counts
    name: str | None = None


class CheckoutBody(_Body):
    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)


class RepairBody(_Body):
    """The snapshot to repair: its damaged pages are recomputed from its token ids."""

    cid: str = Field(min_length=1, max_length=MAX_REVISION_CHARS)
