"""Register a gRPC servicer so that a request which is not a valid protobuf is refused as INVALID_ARGUMENT.

grpcio's generated ``add_*Servicer_to_server`` deserialises before our code runs; bytes that do not parse end
the call as UNKNOWN and log an ERROR with a traceback for every such request — a remote party could fill the
coordinator's log at will. Here the handlers are built from the service's descriptor (the same methods,
streaming shapes and messages as the generated code): parsing happens inside the handler, and a request that
does not parse is answered INVALID_ARGUMENT with what was wrong, logged at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)


def add_checked_servicer(servicer: object, server: grpc.Server, service: ServiceDescriptor) -> None:
    """Serve every method of ``service`` from the same-named method of ``servicer`` (unary or server-streaming)."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}.{method.name}: client-streaming methods are not supported")
        parse = _parser(message_factory.GetMessageClass(method.input_type), f"{service.full_name}/{method.name}")
        behaviour = _checked(getattr(servicer, method.name), parse)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=None, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _parser(cls: Any, what: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        request = cls()
        request.ParseFromString(data)
        return request

    parse.__qualname__ = f"parse {what}"
    return parse


def _checked(behaviour: Callable[[Any, grpc.ServicerContext], Any],
             parse: Callable[[bytes], Any]) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def handler(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = parse(data)
        except (DecodeError, ValueError) as e:
            log.debug("refused a malformed %s: %s", parse.__qualname__, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid protobuf message: {e}")
        return behaviour(request, context)

    return handler
