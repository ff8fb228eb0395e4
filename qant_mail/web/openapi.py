"""The OpenAPI 3.1 document of the API of `serve`, served at `/api/v1/openapi.json`:
written here by hand, next to nothing else, and checked against the specification's
schema by the tests."""

from __future__ import annotations

from typing import Any

from qant_mail import __version__

_STATUSES = ["active", "unsubscribed", "bounced", "complained"]
_TIME = {"type": "string", "format": "date-time"}
_ID = {"type": "integer", "minimum": 1}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    said = {
        "400": "the body is not JSON",
        "401": "no token, or not a valid one (WWW-Authenticate: Bearer)",
        "403": "the token's scope is read; this needs write",
        "404": "no such reader, send or resource",
        "413": "the body is larger than 64 KiB",
        "415": "the body is not application/json",
        "422": "the request cannot be done as it is: each field with what is wrong",
        "429": "a limit is reached: try again after Retry-After seconds",
    }
    content = {"application/problem+json": {"schema": _ref("Problem")}}
    return {
        str(status): {"description": said[str(status)], "content": content} for status in statuses
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_PAGING = [
    _query(
        "limit",
        "how many items, 100 unless given",
        {"type": "integer", "minimum": 1, "maximum": 500},
    ),
    _query(
        "after",
        "the `next_after` of the previous page (0 or none: the first page)",
        {"type": "integer", "minimum": 0},
    ),
]
_READER_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the reader's number",
    "schema": _ID,
}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "An error, as RFC 9457's problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "Consent": {
        "type": "object",
        "description": "How a reader added as already confirmed gave their consent.",
        "required": ["source", "at"],
        "additionalProperties": False,
        "properties": {
            "source": {"type": "string", "maxLength": 200, "description": "where: a form, a page"},
            "at": {**_TIME, "description": "when they asked, with its offset from UTC"},
            "confirmed_at": {**_TIME, "description": "when they confirmed their address"},
            "ip": {"type": "string", "description": "from where they asked"},
        },
    },
    "NewReader": {
        "type": "object",
        "required": ["email"],
        "additionalProperties": False,
        "properties": {
            "email": {"type": "string", "format": "email"},
            "name": {"type": "string", "maxLength": 200},
            "newsletters": {
                "type": "array",
                "items": {"type": "string"},
                "description": "newsletter keys; the main newsletter unless given",
            },
            "confirmed": {
                "type": "boolean",
                "default": False,
                "description": "false: a confirmation is mailed (double opt-in); true: "
                "subscribed now, with `consent`",
            },
            "consent": _ref("Consent"),
        },
    },
    "ReaderChange": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "name": {"type": "string", "maxLength": 200},
            "newsletters": {
                "type": "array",
                "items": {"type": "string"},
                "description": "every newsletter they get from now on: those left out are "
                "unsubscribed",
            },
        },
    },
    "Pending": {
        "type": "object",
        "required": ["status", "email", "newsletters"],
        "properties": {
            "status": {"const": "pending"},
            "email": {"type": "string"},
            "newsletters": {"type": "array", "items": {"type": "string"}},
            "detail": {"type": "string"},
        },
    },
    "Reader": {
        "type": "object",
        "required": ["id", "email", "name", "status", "created_at", "newsletters"],
        "properties": {
            "id": _ID,
            "email": {"type": "string"},
            "name": {"type": "string"},
            "status": {"enum": ["active", "bounced", "complained"]},
            "created_at": _TIME,
            "newsletters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "status", "since", "reason", "source", "consent"],
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"enum": _STATUSES},
                        "since": _TIME,
                        "reason": {"type": "string"},
                        "source": {"type": "string"},
                        "consent": {
                            "oneOf": [
                                {"type": "null"},
                                {
                                    "type": "object",
                                    "properties": {
                                        "asked_at": _TIME,
                                        "form": {"type": "string"},
                                        "confirmed_at": {"type": ["string", "null"]},
                                    },
                                },
                            ]
                        },
                    },
                },
            },
        },
    },
    "ListedReader": {
        "type": "object",
        "required": ["id", "email", "name", "status", "since", "reason", "created_at", "source"],
        "properties": {
            "id": _ID,
            "email": {"type": "string"},
            "name": {"type": "string"},
            "status": {"enum": _STATUSES},
            "since": _TIME,
            "reason": {"type": "string"},
            "created_at": _TIME,
            "source": {"type": "string"},
        },
    },
    "ReaderPage": {
        "type": "object",
        "required": ["newsletter", "data", "next_after"],
        "properties": {
            "newsletter": {"type": "string"},
            "data": {"type": "array", "items": _ref("ListedReader")},
            "next_after": {"type": ["integer", "null"]},
        },
    },
    "Counts": {
        "type": "object",
        "description": "rows of the send in each state",
        "additionalProperties": {"type": "integer"},
    },
    "Send": {
        "type": "object",
        "required": ["id", "issue", "newsletter", "subject", "created_at", "counts"],
        "properties": {
            "id": _ID,
            "issue": {"type": "string"},
            "newsletter": {"type": "string"},
            "subject": {"type": "string"},
            "created_at": _TIME,
            "finished_at": {"type": ["string", "null"]},
            "running": {"type": "boolean"},
            "recipients": {"type": "integer"},
            "counts": _ref("Counts"),
            "bounced": {"type": "integer"},
            "soft_bounced": {"type": "integer"},
            "complaints": {"type": "integer"},
            "unsubscribed": {"type": "integer"},
            "relays": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "SendPage": {
        "type": "object",
        "required": ["data", "next_after"],
        "properties": {
            "data": {"type": "array", "items": _ref("Send")},
            "next_after": {"type": ["integer", "null"]},
        },
    },
    "SendState": {
        "type": "object",
        "required": ["id", "issue", "counts", "left", "running"],
        "properties": {
            "id": _ID,
            "issue": {"type": "string"},
            "newsletter": {"type": "string"},
            "subject": {"type": "string"},
            "created_at": _TIME,
            "finished_at": {"type": ["string", "null"]},
            "running": {"type": "boolean"},
            "recipients": {"type": "integer"},
            "left": {"type": "integer", "description": "rows still to be sent"},
            "counts": _ref("Counts"),
            "bounced": {"type": "integer"},
            "soft_bounced": {"type": "integer"},
            "complaints": {"type": "integer"},
            "rate_per_second": {"type": "number"},
            "expected_finish": {"type": ["string", "null"]},
            "relays": {"type": "object", "additionalProperties": {"type": "integer"}},
            "approved": {"type": ["object", "null"]},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/subscribers": {
        "get": {
            "operationId": "listReaders",
            "summary": "A newsletter's readers by number, a page at a time",
            "parameters": [
                _query(
                    "newsletter", "its key; the main newsletter unless given", {"type": "string"}
                ),
                _query("status", "of this status only", {"enum": _STATUSES}),
                _query("email", "the reader with this address only", {"type": "string"}),
                *_PAGING,
            ],
            "responses": {
                "200": _json(_ref("ReaderPage"), "a page of readers"),
                **_errors(401, 422, 429),
            },
        },
        "post": {
            "operationId": "createReader",
            "summary": "Add a reader: double opt-in, or already confirmed with their consent",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("NewReader")}},
            },
            "responses": {
                "201": _json(_ref("Reader"), "a confirmed reader, new"),
                "200": _json(_ref("Reader"), "a confirmed reader, known before"),
                "202": _json(_ref("Pending"), "the confirmation is mailed"),
                **_errors(400, 401, 403, 413, 415, 422, 429),
            },
            "security": [{"bearer": ["write"]}],
        },
    },
    "/subscribers/{id}": {
        "parameters": [_READER_ID],
        "get": {
            "operationId": "getReader",
            "summary": "One reader, with each of their newsletters",
            "responses": {"200": _json(_ref("Reader"), "the reader"), **_errors(401, 404, 429)},
        },
        "patch": {
            "operationId": "changeReader",
            "summary": "Change a reader's name, or the newsletters they get",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ReaderChange")}},
            },
            "responses": {
                "200": _json(_ref("Reader"), "the reader, changed"),
                **_errors(400, 401, 403, 404, 413, 415, 422, 429),
            },
            "security": [{"bearer": ["write"]}],
        },
        "delete": {
            "operationId": "unsubscribeReader",
            "summary": "Unsubscribe a reader from every newsletter, or from one (kept)",
            "parameters": [_query("newsletter", "from this newsletter only", {"type": "string"})],
            "responses": {
                "200": _json(_ref("Reader"), "the reader, unsubscribed"),
                **_errors(401, 403, 404, 422, 429),
            },
            "security": [{"bearer": ["write"]}],
        },
    },
    "/sends": {
        "get": {
            "operationId": "listSends",
            "summary": "Every send, the latest first, a page at a time",
            "parameters": list(_PAGING),
            "responses": {
                "200": _json(_ref("SendPage"), "a page of sends"),
                **_errors(401, 422, 429),
            },
        },
    },
    "/sends/{issue}": {
        "parameters": [
            {
                "name": "issue",
                "in": "path",
                "required": True,
                "description": "the issue's name: its file's, without .yaml",
                "schema": {"type": "string"},
            }
        ],
        "get": {
            "operationId": "getSend",
            "summary": "Where the send of an issue stands",
            "responses": {"200": _json(_ref("SendState"), "its state"), **_errors(401, 404, 429)},
        },
    },
}


def document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qant-mail API",
            "version": __version__,
            "description": "Readers and sends of a qant-mail installation. Every request "
            "but this document's carries `Authorization: Bearer TOKEN`, a token of "
            "QANT_API_TOKEN: GET needs the read or write scope, the others write.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": ["read"]}],
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
