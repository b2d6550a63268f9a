// Key Vault holding the OAuth client secret (ms-client-secret), the webhook signing secret
// (webhook-secret) and the token encryption key ring (token-encryption-keys).
// Authorisation is Azure RBAC only (no access policies); soft delete and purge protection are on,
// so a deleted key ring can be recovered and never silently destroyed.
//
// The token key ring is NOT written here: ARM has no source of real randomness (uniqueString and
// newGuid are derived/predictable), and re-deploying must never rotate it. The azd postprovision
// hook (scripts/postprovision.*) creates it once with Python's `secrets` module.

@description('Key Vault name (3-24 characters).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Tags applied to the vault.')
param tags object = {}

@description('Days a deleted vault or secret stays recoverable (7-90).')
@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 90

@description('Secret name of the Entra client secret (MS_CLIENT_SECRET_NAME).')
param clientSecretName string

@secure()
@description('Entra client secret. Written only when non-empty, so re-provisioning without it keeps the stored value.')
param clientSecretValue string = ''

@description('Secret name of the webhook signing secret.')
param webhookSecretName string

@secure()
@description('Webhook signing secret. Written only when non-empty; otherwise the postprovision hook generates one once.')
param webhookSecretValue string = ''

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    // Reachable publicly (the app is not VNet-integrated); every call needs an Entra token and
    // an RBAC role on this vault (see infra/README.md, CKV_AZURE_109 / CKV_AZURE_189).
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

module clientSecret 'keyvault-secret.bicep' = if (!empty(clientSecretValue)) {
  name: 'secret-${clientSecretName}'
  params: {
    vaultName: vault.name
    name: clientSecretName
    value: clientSecretValue
  }
}

module webhookSecret 'keyvault-secret.bicep' = if (!empty(webhookSecretValue)) {
  name: 'secret-${webhookSecretName}'
  params: {
    vaultName: vault.name
    name: webhookSecretName
    value: webhookSecretValue
  }
}

// Never output a secret value: only the vault's name, id and URI.
output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
