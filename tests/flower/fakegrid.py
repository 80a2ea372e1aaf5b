"""An in-process Flower ``Grid``: messages go through Flower's own serialisation to ClientApp handlers.

It stands in for a SuperLink and its SuperNodes in the fast tests: each node has its
own ``Context`` (node config and persistent ``state``, as a SuperNode keeps them),
every message and reply is deflated and inflated as on the wire, and a ClientApp
exception becomes the error reply Flower would send. Nodes can be taken offline
(not listed, messages fail as NODE_UNAVAILABLE) or made *silent* (listed, never
answer), which is what a killed SuperNode looks like until its heartbeat expires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents


def wire(message: Message) -> Message:
    """The message as the receiver sees it: deflated, inflated, message id kept."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    out = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(out, Message)
    out.metadata.__dict__["_message_id"] = message.metadata.message_id
    return out


class LocalGrid(Grid):
    """A SuperLink with SuperNodes in this process."""

    def __init__(self, app: ClientApp, node_configs: Mapping[int, Mapping[str, Any]]) -> None:
        self.app = app
        self.contexts = {
            n: Context(run_id=7, node_id=n, node_config=dict(cfg), state=RecordDict(), run_config={})
            for n, cfg in node_configs.items()
        }
        self.online = set(node_configs)
        self.silent: set[int] = set()
        self.replies: dict[str, Message] = {}
        self.log: list[tuple[str, int, str]] = []  # (message type, node, group id) of every message pushed
        self.before_handle: Callable[[Message], None] | None = None
        self.after_handle: Callable[[Message], Message] | None = None  # e.g. a site that tampers with its reply
        self._run: Any = None

    # ----------------------------------------------------------------- Grid API
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            self.log.append((msg.metadata.message_type, node, msg.metadata.group_id))
            if node in self.silent:
                continue
            if node not in self.online:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "node is offline"), reply_to=msg)
            else:
                reply = self._handle(wire(msg), self.contexts[node])
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[msg.metadata.message_id] = wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    # ----------------------------------------------------------------- helpers
    def _handle(self, msg: Message, context: Context) -> Message:
        try:
            if self.before_handle is not None:
                self.before_handle(msg)
            reply = self.app(msg, context)
            return reply if self.after_handle is None else self.after_handle(reply)
        except Exception as ex:  # what flwr.supernode.runtime.run_clientapp does
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
