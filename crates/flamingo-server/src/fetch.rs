//! Media URL fetching (data:, http(s): with SSRF protection, file: under a directory).
