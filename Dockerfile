# SliceWise API and CPU workers. No build step: the CLI runs TypeScript through tsx.
FROM node:20-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production SLICEWISE_DATA_DIR=/data
COPY package.json package-lock.json ./
# The training engine is an npm workspace: npm ci links it, so its package.json must be there first.
COPY packages/tfjs-wasm-training/package.json ./packages/tfjs-wasm-training/
RUN npm ci --omit=dev && npm cache clean --force
COPY packages ./packages
COPY bin ./bin
COPY src ./src
COPY configs ./configs
COPY migrations ./migrations
COPY tsconfig.json ./
VOLUME /data
ENTRYPOINT ["node", "bin/slicewise.mjs"]
CMD ["api", "--host", "0.0.0.0", "--port", "8787"]
