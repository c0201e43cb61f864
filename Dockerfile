# The Tokenwell gateway, as docker-compose.yml runs it: `tokenwell` installed from this checkout.
FROM python:3.11-slim

WORKDIR /src
# Only what `pip install .` needs, so the build ignores .venv, caches and ledgers.
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY device_sim device_sim
COPY broker broker
RUN pip install --no-cache-dir . \
    && useradd --system --create-home tokenwell \
    && mkdir /data && chown tokenwell /data

USER tokenwell
# The ledger (and the admin token the gateway keeps beside it).
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["tokenwell"]
CMD ["gateway", "--broker", "mqtt://mosquitto:1883", "--db", "/data/ledger.sqlite3", "--api", "0.0.0.0:8080"]
