// Role assignments, least privilege, each scoped to the one resource it is needed on.
//
// Built-in role definition ids (verify at the URL next to each; ids are the same in every tenant):
//   Storage Blob Data Owner        b7e6dc6d-f1e8-4753-8033-0f276bb0955b
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage#storage-blob-data-owner
//   Storage Queue Data Contributor 974c5e8b-45b9-4653-ba55-5f855dd0fb88
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage#storage-queue-data-contributor
//   Storage Table Data Contributor 0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage#storage-table-data-contributor
//   Key Vault Secrets User         4633458b-17de-408a-b874-0445c86b69e6
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/security#key-vault-secrets-user
//   Key Vault Secrets Officer      b86a8fe4-44ce-4948-aee5-eccb2c155cd7
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/security#key-vault-secrets-officer
//   Key Vault Certificates Officer a4417e6f-fecd-4de8-b567-7b0420556985
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/security#key-vault-certificates-officer
//   Monitoring Metrics Publisher   3913510d-42f4-4e42-8a64-420c390055eb
//     https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/monitor#monitoring-metrics-publisher
//
// Why each one:
//   - Blob Data Owner on the storage account: the Functions host keeps its leases/keys in blobs
//     and Flex Consumption reads the deployment package with this identity (the documented role
//     for AzureWebJobsStorage with an identity).
//   - Queue Data Contributor: queue triggers (refresh-jobs, webhook-deliveries, notification-jobs) and their -poison
//     queues; the app enqueues work.
//   - Table Data Contributor: the app's tables (accounts, oauthstates, refreshindex, idempotency,
//     subscriptions, subscriptionindex, seenmessages).
//   - Key Vault Secrets User (read secrets only) on the one vault that holds this app's secrets.
//   - Monitoring Metrics Publisher on the Application Insights component: Entra-authenticated
//     telemetry ingestion (local auth is disabled).
//   - Key Vault Secrets Officer for the deploying principal (AZURE_PRINCIPAL_ID): the azd
//     postprovision hook creates the token key ring and webhook secret.
//   - Key Vault Certificates Officer for the deploying principal, only with
//     msClientCredential=certificate: the operator creates / rotates the certificate in the vault
//     (the app reads its key as a secret with Secrets User).
//   - Storage Table Data Contributor for the deploying principal, only with grantDeployerDataRoles:
//     `python -m shared.cli reencrypt` (key rotation, docs/deploy.md) reads and rewrites the accounts
//     table from the operator's machine (it reads the key ring with the Secrets Officer role above).

@description('Principal (object) id of the app\'s user-assigned managed identity.')
param appPrincipalId string

@description('Object id of the principal running azd; empty to skip its Key Vault role.')
param deployerPrincipalId string = ''

@description('Type of the deploying principal.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

@description('Also give the deploying principal Key Vault Certificates Officer (MS_CLIENT_CREDENTIAL=certificate).')
param grantDeployerCertificatesOfficer bool = false

@description('Also give the deploying principal Storage Table Data Contributor (for `python -m shared.cli reencrypt`).')
param grantDeployerDataRoles bool = false

@description('Storage account used for host storage, deployment package, tables and queues.')
param storageAccountName string

@description('Key Vault holding the app\'s secrets.')
param keyVaultName string

@description('Application Insights component.')
param applicationInsightsName string

var roleIds = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  keyVaultCertificatesOfficer: 'a4417e6f-fecd-4de8-b567-7b0420556985'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource appBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roleIds.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roleIds.storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, roleIds.storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roleIds.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.keyVaultSecretsUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, appPrincipalId, roleIds.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource deployerSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, roleIds.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.keyVaultSecretsOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

resource deployerTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantDeployerDataRoles && !empty(deployerPrincipalId)) {
  name: guid(storage.id, deployerPrincipalId, roleIds.storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

resource deployerCertificatesOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantDeployerCertificatesOfficer && !empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, roleIds.keyVaultCertificatesOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.keyVaultCertificatesOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}
