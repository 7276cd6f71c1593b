"""Text for the samples: source names and documents (``sources``), the offline Wikipedia
source (``wiki``), the Hub sources (``hub``), and the windows cut from documents (``windows``)."""

from knormctl.engine.text.sources import (SOURCES, Document, iter_documents, load_documents, parse_source,
                                          read_text_file, text_files, validate_source)
from knormctl.engine.text.windows import TextSample, make_samples

__all__ = ["SOURCES", "Document", "TextSample", "iter_documents", "load_documents", "make_samples", "parse_source",
           "read_text_file", "text_files", "validate_source"]
