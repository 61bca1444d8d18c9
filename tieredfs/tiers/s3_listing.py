"""ListObjectsV2 pages read with the standard library's XML parser instead of botocore's.

botocore turns each 1,000-key page into dicts through its shape model: ~25-35 ms of CPU a
page here, most of the 3.7 s of the first `ls` of a directory of 100,000 names (issue 19).
ElementTree's C parser and one pass over each <Contents> take ~5 ms. botocore still sends
the request (signing, retries, errors): a handler on its `before-parse` event reads a
successful page's body into ListedObjects and common prefixes, and leaves botocore an empty
result to parse. Error answers and anything unexpected go through botocore as before.

Names are decoded as botocore decodes them (S3 sends them URL-encoded: botocore asks for
EncodingType=url so that characters XML cannot carry survive; docs/namespace.md).
"""

import datetime
import logging
import weakref
import xml.etree.ElementTree as ET
from urllib.parse import unquote_plus

import botocore.handlers

log = logging.getLogger(__name__)

OBJECTS = "TieredfsObjects"  # keys of the parsed page that hold the lean results
PREFIXES = "TieredfsPrefixes"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY = (b'<?xml version="1.0" encoding="UTF-8"?>'
          b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListBucketResult>')
_EVENT_ALL = "before-parse.s3.*"
_ID = "tieredfs-lean-list"
_INSTALLED: "weakref.WeakSet" = weakref.WeakSet()


def install(client, make_object) -> None:
    """Read this client's ListObjectsV2 pages leanly; make_object(key, size, mtime_ns, etag)."""
    def lean(response_dict, customized_response_dict, **_):
        if response_dict.get("status_code") != 200:
            return
        try:
            page = parse(response_dict["body"], make_object)
        except (ET.ParseError, ValueError, TypeError, AttributeError, KeyError) as e:
            log.debug("event=lean_listing_declined error=%r action=botocore_parses_it", str(e))
            return  # botocore parses it (and says what is wrong with it)
        customized_response_dict.update(page)
        response_dict["body"] = _EMPTY

    if client in _INSTALLED:
        return
    _INSTALLED.add(client)
    events = client.meta.events  # this client's own copy of the session's handlers
    events.register_first(_EVENT_ALL, _only_lists(lean), unique_id=_ID)
    # botocore checks every S3 200 answer for an <Error> body by parsing it whole (9 ms a
    # page here); run after this handler, it sees a read page's empty body instead. An
    # unreadable page is left as it came, so botocore's check still turns a truncated one
    # or an <Error> into a retry.
    check = getattr(botocore.handlers, "_handle_200_error", None)
    if check is not None:
        events.unregister(_EVENT_ALL, check)
        events.register_first(_EVENT_ALL, check)


def _only_lists(handler):
    def on_s3_parse(operation_model, **kwargs):
        if operation_model.name == "ListObjectsV2":
            handler(**kwargs)

    return on_s3_parse


def parse(body: bytes, make_object) -> dict:
    root = ET.fromstring(body)
    if root.tag != _NS + "ListBucketResult":
        raise ValueError(f"not a ListBucketResult: {root.tag[:80]!r}")
    url = root.findtext(_NS + "EncodingType") == "url"
    decode = unquote_plus if url else _same
    objects, prefixes = [], []
    page = {OBJECTS: objects, PREFIXES: prefixes,
            "IsTruncated": root.findtext(_NS + "IsTruncated") == "true"}
    token = root.findtext(_NS + "NextContinuationToken")
    if token is not None:
        page["NextContinuationToken"] = token
    key_tag, size_tag, mtime_tag, etag_tag = (_NS + t for t in ("Key", "Size", "LastModified", "ETag"))
    for entry in root.iterfind(_NS + "Contents"):
        fields = {child.tag: child.text for child in entry}
        mtime = datetime.datetime.fromisoformat(fields[mtime_tag])
        if mtime.tzinfo is None:
            mtime = mtime.replace(tzinfo=datetime.timezone.utc)
        objects.append(make_object(decode(fields[key_tag]), int(fields[size_tag]),
                                   int(mtime.timestamp() * 1e9), (fields.get(etag_tag) or "").strip('"')))
    for entry in root.iterfind(_NS + "CommonPrefixes"):
        prefixes.append(decode(entry.findtext(_NS + "Prefix")))
    return page


def entries(page: dict, listed) -> tuple[list, list]:
    """(common prefixes, objects) of a page, parsed here or (declined) by botocore."""
    if OBJECTS in page:
        return page[PREFIXES], page[OBJECTS]
    return [p["Prefix"] for p in page.get("CommonPrefixes", ())], [listed(o) for o in page.get("Contents", ())]


def _same(text: str) -> str:
    return text
