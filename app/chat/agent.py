"""The agent: which model answers (by settings), its instructions and its MCP tools.

* ``OPENAI_BASE_URL`` set: any OpenAI-compatible server over Chat Completions (Ollama, vLLM,
  LiteLLM…), with ``OPENAI_API_KEY`` if that server wants one; ``MODEL_NAME`` is required.
* else ``OPENAI_API_KEY`` set: OpenAI's Responses API.
* else: the offline demo model, which needs no key and no network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal

from agents import (
    Agent,
    Model,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunContextWrapper,
    Tool,
)
from agents.mcp import MCPServer, MCPServerStreamableHttp, MCPToolMetaContext
from agents.models.default_models import get_default_model
from chatkit.agents import AgentContext
from openai import AsyncOpenAI

from app.chat.identity import IDENTITY_META_KEY, IdentitySigner
from app.chat.offline_model import OFFLINE_MODEL_NAME, OfflineModel
from app.context import RequestContext
from app.errors import ConfigurationError
from app.settings import Settings

log = logging.getLogger(__name__)

Provider = Literal["openai", "openai-compatible", "offline", "custom"]
ChatAgent = Agent[AgentContext[RequestContext]]

TITLE_INSTRUCTIONS = (
    "You name chat conversations. Reply with a title of at most six words for the "
    "conversation that starts with the user's message below: no quotes, no final period."
)


@dataclass
class ModelSetup:
    model: Model
    provider: Provider
    name: str
    client: AsyncOpenAI | None = None

    @property
    def is_offline(self) -> bool:
        return self.provider == "offline"

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()


def check_model_settings(settings: Settings) -> None:
    """The model settings' mistakes, found before anything starts (``python -m app serve``
    checks them up front so the operator reads one line, not a traceback from the lifespan)."""
    if settings.openai_base_url and not settings.model_name:
        raise ConfigurationError(
            "OPENAI_BASE_URL is set: also set MODEL_NAME to a model that server serves"
        )


def choose_model(settings: Settings, override: Model | None = None) -> ModelSetup:
    """The model the settings ask for (``override`` wins: tests and embedding apps)."""
    if override is not None:
        offline = isinstance(override, OfflineModel)
        return ModelSetup(override, "offline" if offline else "custom", type(override).__name__)
    check_model_settings(settings)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if settings.openai_base_url:
        assert settings.model_name  # check_model_settings
        client = AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=key or "not-needed",
            timeout=settings.openai_timeout_seconds,
            max_retries=2,
        )
        model: Model = OpenAIChatCompletionsModel(model=settings.model_name, openai_client=client)
        return ModelSetup(model, "openai-compatible", settings.model_name, client)
    if key:
        name = settings.model_name or get_default_model()
        client = AsyncOpenAI(api_key=key, timeout=settings.openai_timeout_seconds, max_retries=2)
        return ModelSetup(
            OpenAIResponsesModel(model=name, openai_client=client), "openai", name, client
        )
    return ModelSetup(
        OfflineModel(word_delay=settings.offline_word_delay_seconds), "offline", OFFLINE_MODEL_NAME
    )


def load_instructions(settings: Settings) -> str:
    """The system prompt: ``AGENT_INSTRUCTIONS_FILE`` if set, else ``AGENT_INSTRUCTIONS``."""
    path = settings.agent_instructions_file
    if path is None:
        return settings.agent_instructions
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read AGENT_INSTRUCTIONS_FILE {path}: {exc}") from exc
    if not text:
        raise ConfigurationError(f"AGENT_INSTRUCTIONS_FILE {path} is empty")
    return text


def build_agent(
    instructions: str,
    model: Model,
    mcp_servers: list[MCPServer],
    *,
    max_output_tokens: int | None = None,
    tools: list[Tool] | None = None,
) -> ChatAgent:
    def system_prompt(
        ctx: RunContextWrapper[AgentContext[RequestContext]], agent: ChatAgent
    ) -> str:
        locale = ctx.context.request_context.locale
        if not locale:
            return instructions
        return (
            f"{instructions}\n\nThe user's browser prefers the language '{locale}'; answer in "
            "it unless the user writes in another language."
        )

    return Agent[AgentContext[RequestContext]](
        name="assistant",
        instructions=system_prompt,
        model=model,
        mcp_servers=mcp_servers,
        tools=tools or [],  # plugins' function tools (app.chat.plugins)
        # Bounds every model call of a reply (each turn of a tool loop gets the same bound).
        model_settings=ModelSettings(max_tokens=max_output_tokens),
    )


def build_title_agent(model: Model) -> Agent[Any]:
    return Agent(name="titler", instructions=TITLE_INSTRUCTIONS, model=model)


def identity_meta_resolver(
    signer: IdentitySigner, audience: str
) -> Callable[[MCPToolMetaContext], dict[str, Any]]:
    """The ``_meta`` of every ``tools/call`` to the MCP server at ``audience``.

    The MCP session is shared by every user, so who is asking is decided per call, from the
    run context of the reply that makes the call (never from anything the session keeps).
    Only our own signed token goes out, never the user's bearer token."""

    def resolve(call: MCPToolMetaContext) -> dict[str, Any]:
        agent_context = call.run_context.context
        if not isinstance(agent_context, AgentContext):
            # A tool call outside a ChatKit reply: there is nobody to vouch for.
            raise RuntimeError("MCP tool called outside a ChatKit reply")
        request: RequestContext = agent_context.request_context
        token = signer.mint(
            user_id=request.user_id, audience=audience, thread_id=agent_context.thread.id
        )
        return {IDENTITY_META_KEY: token}

    return resolve


async def connect_mcp_servers(
    settings: Settings, stack: AsyncExitStack, identity: IdentitySigner | None = None
) -> list[MCPServer]:
    """Connect every ``MCP_SERVER_URLS`` entry; ``stack`` closes them at shutdown. With
    ``identity``, each tool call carries a token for its user, addressed to that URL."""
    servers: list[MCPServer] = []
    for index, url in enumerate(settings.mcp_server_urls):
        server = MCPServerStreamableHttp(
            params={"url": url, "timeout": settings.mcp_timeout_seconds},
            cache_tools_list=True,
            name=f"mcp{index}",
            client_session_timeout_seconds=settings.mcp_timeout_seconds,
            max_retry_attempts=2,
            tool_meta_resolver=(
                identity_meta_resolver(identity, url) if identity is not None else None
            ),
        )
        try:
            await server.connect()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ConfigurationError(
                f"cannot connect to the MCP server at {url} ({type(exc).__name__}); check "
                "MCP_SERVER_URLS and that the server is running"
            ) from exc
        stack.push_async_callback(server.cleanup)
        servers.append(server)
        log.info("connected MCP server", extra={"url": url})
    return servers
