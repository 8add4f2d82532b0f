"""Builders for every ChatKit item type, shared by the store, server and bench code."""

from __future__ import annotations

from datetime import datetime, timedelta

from chatkit.types import (
    Annotation,
    AssistantMessageContent,
    AssistantMessageItem,
    ClientToolCallItem,
    CustomSummary,
    CustomTask,
    EndOfTurnItem,
    FileAttachment,
    FileSource,
    GeneratedImage,
    GeneratedImageItem,
    HiddenContextItem,
    ImageAttachment,
    InferenceOptions,
    SDKHiddenContextItem,
    SearchTask,
    StructuredInputFreeform,
    StructuredInputItem,
    StructuredInputMultipleChoice,
    StructuredInputMultipleChoiceOption,
    TaskItem,
    ThoughtTask,
    ThreadItem,
    ThreadMetadata,
    URLSource,
    UserMessageItem,
    UserMessageTagContent,
    UserMessageTextContent,
    WidgetItem,
    Workflow,
    WorkflowItem,
)
from chatkit.widgets import Card, Text

from app.ids import new_id

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901)


def thread(
    created_at: datetime | None = None, title: str | None = None, **kw: object
) -> ThreadMetadata:
    return ThreadMetadata(
        id=new_id("thread"), created_at=created_at or datetime.now(), title=title, **kw
    )  # type: ignore[arg-type]


def file_attachment(thread_id: str | None = None) -> FileAttachment:
    return FileAttachment(
        id=new_id("attachment"), name="report.pdf", mime_type="application/pdf", thread_id=thread_id
    )


def image_attachment(thread_id: str | None = None) -> ImageAttachment:
    return ImageAttachment(
        id=new_id("attachment"),
        name="cat.png",
        mime_type="image/png",
        preview_url="https://files.example.com/cat.png",  # type: ignore[arg-type]
        thread_id=thread_id,
        metadata={"bytes": 1234},
    )


def user_message(
    thread_id: str, text: str = "hello", created_at: datetime | None = None
) -> UserMessageItem:
    return UserMessageItem(
        id=new_id("message"),
        thread_id=thread_id,
        created_at=created_at or datetime.now(),
        content=[UserMessageTextContent(text=text)],
        inference_options=InferenceOptions(),
    )


def all_item_types(thread_id: str, base: datetime = T0) -> list[ThreadItem]:
    """One of each item type the SDK has, with their optional parts filled in."""
    t = lambda n: base + timedelta(seconds=n)  # noqa: E731
    return [
        UserMessageItem(
            id=new_id("message"),
            thread_id=thread_id,
            created_at=t(0),
            content=[
                UserMessageTextContent(text="Summarise these, please — ünïcode ✓"),
                UserMessageTagContent(id="tag1", text="@alice", data={"k": [1, 2]}, group="people"),
            ],
            attachments=[file_attachment(thread_id), image_attachment(thread_id)],
            quoted_text="earlier words",
            inference_options=InferenceOptions(model="gpt-test"),
        ),
        AssistantMessageItem(
            id=new_id("message"),
            thread_id=thread_id,
            created_at=t(1),
            content=[
                AssistantMessageContent(
                    text="Here is a summary.",
                    annotations=[
                        Annotation(
                            source=URLSource(title="Doc", url="https://example.com"), index=4
                        ),
                        Annotation(source=FileSource(title="F", filename="report.pdf")),
                    ],
                )
            ],
        ),
        WidgetItem(
            id=new_id("message"),
            thread_id=thread_id,
            created_at=t(2),
            widget=Card(children=[Text(id="t1", value="Widget text", streaming=False)]),
            copy_text="Widget text",
        ),
        WorkflowItem(
            id=new_id("workflow"),
            thread_id=thread_id,
            created_at=t(3),
            workflow=Workflow(
                type="reasoning",
                tasks=[
                    ThoughtTask(content="thinking", title="Thought"),
                    SearchTask(
                        queries=["q1"], sources=[URLSource(title="S", url="https://s.example")]
                    ),
                ],
                summary=CustomSummary(title="Done"),
                expanded=True,
            ),
        ),
        TaskItem(
            id=new_id("task"),
            thread_id=thread_id,
            created_at=t(4),
            task=CustomTask(title="Task", content="did a thing", status_indicator="complete"),
        ),
        ClientToolCallItem(
            id=new_id("tool_call"),
            thread_id=thread_id,
            created_at=t(5),
            call_id="call_1",
            name="get_location",
            arguments={"precise": True, "nested": {"a": [1, None]}},
            status="completed",
            output={"lat": 1.5},
        ),
        HiddenContextItem(
            id=new_id("message"), thread_id=thread_id, created_at=t(6), content={"secret": "ctx"}
        ),
        SDKHiddenContextItem(
            id=new_id("sdk_hidden_context"),
            thread_id=thread_id,
            created_at=t(7),
            content="cancelled",
        ),
        GeneratedImageItem(
            id=new_id("message"),
            thread_id=thread_id,
            created_at=t(8),
            image=GeneratedImage(id="img1", url="https://img.example/1.png"),
        ),
        StructuredInputItem(
            id=new_id("message"),
            thread_id=thread_id,
            created_at=t(9),
            inputs=[
                StructuredInputMultipleChoice(
                    id="q1",
                    question="Pick",
                    options=[StructuredInputMultipleChoiceOption(value="a")],
                ),
                StructuredInputFreeform(id="q2", question="Why?", description="free text"),
            ],
        ),
        EndOfTurnItem(id=new_id("message"), thread_id=thread_id, created_at=t(10)),
    ]
