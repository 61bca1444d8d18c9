"""The lean ListObjectsV2 parser (tiers/s3_listing.py) against botocore's own reading of the
same pages. Pages from moto through a mount: tests/test_namespace.py (awkward keys)."""

import pytest

from tieredfs.tiers import s3_listing
from tieredfs.tiers.s3 import ListedObject

PAGE = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        b'<Prefix>d%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>%2F</Delimiter>'
        b'<IsTruncated>true</IsTruncated><EncodingType>url</EncodingType>'
        b'<NextContinuationToken>tok+en/=</NextContinuationToken>'
        b'<Contents><Key>d%2Fa+b%25zz%F0%9F%98%80</Key><LastModified>2026-12-07T06:00:00.000Z</LastModified>'
        b'<ETag>&quot;0123456789abcdef0123456789abcdef&quot;</ETag><Size>6</Size>'
        b'<StorageClass>STANDARD</StorageClass></Contents>'
        b'<Contents><Size>0</Size><Key>d%2F%0A</Key><ETag>"e-2"</ETag>'
        b'<LastModified>2026-12-07T06:00:01Z</LastModified></Contents>'
        b'<CommonPrefixes><Prefix>d%2Fsub%20dir%2F</Prefix></CommonPrefixes></ListBucketResult>')


def test_a_page_reads_as_botocore_reads_it():
    page = s3_listing.parse(PAGE, ListedObject)
    assert page["IsTruncated"] is True and page["NextContinuationToken"] == "tok+en/="
    prefixes, objects = s3_listing.entries(page, None)
    assert prefixes == ["d/sub dir/"]
    assert objects == [ListedObject("d/a b%zz😀", 6, 1796623200 * 10**9, "0123456789abcdef0123456789abcdef"),
                       ListedObject("d/\n", 0, 1796623201 * 10**9, "e-2")]
    last = PAGE.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert s3_listing.parse(last, ListedObject)["IsTruncated"] is False


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b"not xml", PAGE.replace(b"<Size>6</Size>", b"")])
def test_what_it_cannot_read_is_left_to_botocore(body):
    with pytest.raises((ValueError, KeyError, s3_listing.ET.ParseError)):
        s3_listing.parse(body, ListedObject)
