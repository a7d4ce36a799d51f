"""Tessera REST/JSON gateway: HTTP routes transcoded to gRPC from the contracts' `google.api.http` rules."""
