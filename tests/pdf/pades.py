"""pyHanko as a real PAdES client of Signet (tests/revocation.rs).

  pades.py sign OUT.pdf --api HOST:PORT --tls-dir DIR --client NAME --policy ID --cert CERT.pem --ca CA.pem
      Sign a fresh one-page PDF (PAdES B-B): pyHanko builds the CMS signed attributes, Signet
      signs their SHA-256 digest over mTLS (POST /v1/sign), pyHanko embeds the signature.
  pades.py validate IN.pdf --ca CA.pem
      Validate with revocation checking on (hard-fail), fetching CRL/OCSP from the URLs in the
      certificate. Prints JSON: intact, valid, trusted, revoked, bottom_line, summary.
"""

import argparse
import asyncio
import base64
import hashlib
import http.client
import io
import json
import ssl
import sys

from asn1crypto import algos
from pyhanko.keys import load_cert_from_pemder
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.registry import SimpleCertificateStore


def minimal_pdf() -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


class SignetSigner(signers.Signer):
    """The private key never leaves Signet's token: only the digest goes there."""

    def __init__(self, args, cert, ca):
        super().__init__(
            signing_cert=cert,
            cert_registry=SimpleCertificateStore.from_certs([ca]),
            signature_mechanism=algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"}),
        )
        self.args = args

    async def async_sign_raw(self, data, digest_algorithm, dry_run=False):
        if dry_run:
            return bytes(80)
        assert digest_algorithm == "sha256", digest_algorithm
        return await asyncio.to_thread(self.remote_sign, hashlib.sha256(data).hexdigest())

    def remote_sign(self, digest_hex):
        a = self.args
        ctx = ssl.create_default_context(cafile=f"{a.tls_dir}/ca.pem")
        ctx.check_hostname = False
        ctx.load_cert_chain(f"{a.tls_dir}/clients/{a.client}.pem", f"{a.tls_dir}/clients/{a.client}.key")
        host, port = a.api.rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
        body = json.dumps({"policy_id": a.policy, "digest_algorithm": "sha256", "digest": digest_hex})
        conn.request("POST", "/v1/sign", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status != 200:
            sys.exit(f"Signet refused to sign: {resp.status} {answer}")
        return base64.b64decode(answer["signature"])


def sign(args):
    cert = load_cert_from_pemder(args.cert)
    ca = load_cert_from_pemder(args.ca)
    writer = IncrementalPdfFileWriter(io.BytesIO(minimal_pdf()))
    meta = signers.PdfSignatureMetadata(field_name="Signature1", md_algorithm="sha256")
    with open(args.out, "wb") as f:
        signers.sign_pdf(writer, meta, signer=SignetSigner(args, cert, ca), output=f)


async def validate(args):
    ca = load_cert_from_pemder(args.ca)
    vc = ValidationContext(trust_roots=[ca], allow_fetching=True, revocation_mode="hard-fail")
    with open(args.pdf, "rb") as f:
        reader = PdfFileReader(f)
        sig = reader.embedded_signatures[0]
        status = await async_validate_pdf_signature(sig, vc)
    print(json.dumps({
        "intact": status.intact,
        "valid": status.valid,
        "trusted": status.trusted,
        "revoked": status.revoked,
        "bottom_line": status.bottom_line,
        "summary": status.summary(),
    }))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sign")
    s.add_argument("out")
    for k in ("--api", "--tls-dir", "--client", "--policy", "--cert", "--ca"):
        s.add_argument(k, required=True)
    v = sub.add_parser("validate")
    v.add_argument("pdf")
    v.add_argument("--ca", required=True)
    args = p.parse_args()
    if args.cmd == "sign":
        sign(args)
    else:
        asyncio.run(validate(args))


if __name__ == "__main__":
    main()
